"""The real text shipped inside the package (``somoe/data/corpus/``), read through importlib.resources.

- 2,415 TinyStories training stories and 300 disjoint dev stories (``data.source=builtin``, the
  offline default), xz-compressed, under CDLA-Sharing-1.0 (licence text and attribution beside them);
- *The Adventures of Sherlock Holmes* (public domain), the default out-of-domain text of ``somoe adapt``.

importlib.resources reads them from wherever the package is installed (a wheel, a zip, an
editable checkout), so a plain ``pip install .`` works offline.
"""

from __future__ import annotations

import lzma
from functools import lru_cache
from importlib import resources

from ..config import ConfigError

CORPUS = "corpus"  # the folder beside this module
FILES = {"train": "tinystories_train.txt.xz", "val": "tinystories_dev.txt.xz",
         "ood": "sherlock_holmes_adventures.txt.xz"}
# bump when a shipped file changes, so that caches keyed on the built-in corpus are rebuilt
CORPUS_VERSION = "tinystories-2415-300.v1"
ATTRIBUTION = ("TinyStories: Ronen Eldan and Yuanzhi Li (2023), \"TinyStories: How Small Can Language Models Be "
               "and Still Speak Coherent English?\", arXiv:2305.07759; Hugging Face dataset roneneldan/TinyStories; "
               "licensed CDLA-Sharing-1.0 (text shipped in somoe/data/corpus/)")
OOD_NAME = "The Adventures of Sherlock Holmes (public domain)"


@lru_cache(maxsize=None)
def read_packaged_text(name: str) -> str:
    """The decompressed UTF-8 text of a shipped file (``FILES`` values)."""
    resource = resources.files(__package__).joinpath(CORPUS, name)
    try:
        return lzma.decompress(resource.read_bytes()).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"the built-in corpus file {name} is missing from this somoe install; reinstall somoe "
                          f"(pip install .) or point data.train_path / data.val_path at your own files") from None


def builtin_ood_text() -> str:
    """The built-in out-of-domain text (one long document) for ``somoe adapt``."""
    return read_packaged_text(FILES["ood"])
