"""Documents and per-document counts of the ``somoe_stories`` lm-evaluation-harness task."""

import re
from pathlib import Path

import datasets

EOT = "<|endoftext|>"


def load_stories(data_file=None, **_):
    """One document per story: split on ``<|endoftext|>``, stripped, empty ones dropped (as ``somoe eval``)."""
    path = Path(data_file) if data_file else Path(__file__).with_name("stories.txt")
    stories = [s.strip() for s in path.read_text(encoding="utf-8").split(EOT)]
    return {"test": datasets.Dataset.from_dict({"text": [s for s in stories if s]})}


def process_results(doc, results):
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"]))
    n_bytes = len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}


def doc_to_target(doc):
    return doc["text"]  # verbatim: a Jinja template would HTML-escape quotes
