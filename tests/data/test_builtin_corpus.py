"""The built-in story generator: deterministic, prefix-stable, distinct, story-shaped."""

from __future__ import annotations

import random
import re

import pytest

from somoe.data import generate_stories
from somoe.data.builtin_corpus import BOYS, GIRLS, PET_NAMES


@pytest.fixture(scope="module")
def ten_k() -> tuple[list[str], None]:
    # no timing assertion here: unit tests must not depend on machine load (speed lives in benchmarks)
    return generate_stories(10_000, 0), None


def test_ten_thousand_distinct(ten_k):
    stories, _ = ten_k
    assert len(stories) == 10_000 and len(set(stories)) == 10_000


def test_story_shape(ten_k):
    stories, _ = ten_k
    words = [len(s.split()) for s in stories]
    assert min(words) >= 80 and max(words) <= 250
    for s in stories[:500]:
        paragraphs = s.split("\n")
        assert len(paragraphs) >= 3 and all(p.strip() == p and p for p in paragraphs)
        assert s.count('"') % 2 == 0  # quotes are balanced
    with_dialogue = sum('"' in s for s in stories)
    assert with_dialogue / len(stories) > 0.9


def test_variety(ten_k):
    stories, _ = ten_k
    names = set(re.findall(r"named (\w+)", " ".join(stories[:2000])))
    assert len(names) >= 60 and names <= set(GIRLS + BOYS + PET_NAMES)
    openings = {s.split(".")[0] for s in stories[:2000]}
    assert len(openings) >= 200


def test_deterministic_and_prefix_stable():
    assert generate_stories(50, 4) == generate_stories(50, 4)
    assert generate_stories(100, 4) == generate_stories(1000, 4)[:100]
    assert generate_stories(5, 4, start=10) == generate_stories(15, 4)[10:]
    assert not set(generate_stories(50, 4)) & set(generate_stories(50, 5))


def test_global_rng_untouched():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate_stories(20, 0)
    assert random.random() == expected
