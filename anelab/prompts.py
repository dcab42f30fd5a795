"""The A&E evaluation prompt set (reference §4): categories, subject nouns, metric sub-prompts."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pandas as pd

from .errors import AnelabError
from .resources import data_file
from .subjects import benchmark_subjects

CATEGORIES = ("animal_animal", "animal_object", "object_object")


def load_prompts(path: str | Path | None = None, categories=CATEGORIES, limit: int | None = None) -> pd.DataFrame:
    """Table of prompts: ``prompt, category, tokens`` (subject nouns, reference §4), ``subjects`` (each noun with the
    colour right before it: ``[(noun, [colour])]``, :func:`anelab.subjects.benchmark_subjects`), file order.

    ``limit`` keeps the first ``limit`` prompts of each category.
    """
    source = Path(path) if path else data_file("ane_prompts.json")
    if not source.is_file():
        raise AnelabError(f"prompt file {str(path)!r} does not exist")
    data = json.loads(source.read_text())
    unknown = set(categories) - set(data["prompts"])
    if unknown:
        raise AnelabError(f"unknown prompt categories {sorted(unknown)}; the file has {sorted(data['prompts'])}")
    nouns = set(data["animals"]) | set(data["objects"])
    rows = []
    for category in categories:
        for prompt in data["prompts"][category][:limit]:
            subjects = benchmark_subjects(prompt, nouns, data["colors"])
            rows.append(
                {"prompt": prompt, "category": category, "tokens": [n for n, _ in subjects], "subjects": subjects}
            )
    return pd.DataFrame(rows)


@functools.lru_cache(maxsize=1)
def benchmark_vocabulary() -> tuple[frozenset, frozenset]:
    """The A&E prompt set's nouns (animals and objects) and attribute words (colours)."""
    data = json.loads(data_file("ane_prompts.json").read_text())
    return frozenset(data["animals"]) | frozenset(data["objects"]), frozenset(data["colors"])


def attribute_pairs(prompt: str) -> tuple[list[tuple[str, str]], list[str]]:
    """The prompt's (colour, noun) pairs — a colour right before its noun — and its nouns, by the A&E prompt set's
    vocabulary: ``"a monkey and a red car"`` → ``([("red", "car")], ["monkey", "car"])``."""
    nouns, colours = benchmark_vocabulary()
    subjects = benchmark_subjects(prompt, nouns, colours)
    return [(m, n) for n, modifiers in subjects for m in modifiers], [n for n, _ in subjects]


def sub_prompts(prompt: str) -> tuple[str, str] | None:
    """The two halves the minimum-object metric scores (reference §2.1): split on " and ", else " with "."""
    for separator in (" and ", " with "):
        if separator in prompt:
            first, second = prompt.split(separator, 1)
            return first, second
    return None
