"""Subjects (anelab.subjects): nouns with their modifiers and roles, resolved against prompts; the benchmark's pairs
from the prompt data; the spaCy parse's error when spaCy is missing."""

import sys

import pytest

from anelab import AnelabError
from anelab.prompts import load_prompts
from anelab.subjects import Subject, SubjectPosition, as_subject, benchmark_subjects, gather, parse_subjects, resolve
from anelab.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_subjects_come_in_every_form_a_user_writes():
    assert as_subject("cat") == Subject("cat")
    assert as_subject(("apple", ["red"])) == Subject("apple", ("red",))
    assert as_subject(("apple", "red")) == Subject("apple", ("red",))
    assert as_subject({"noun": "dog", "role": "suppress"}) == Subject("dog", role="suppress")
    assert as_subject(3) == Subject(3)
    with pytest.raises(AnelabError, match="a subject is a word, a CLIP position, \\(noun, \\[modifiers\\]\\)"):
        as_subject(("apple", 0.5))
    with pytest.raises(AnelabError, match="role must be one of"):
        Subject("cat", role="excited")
    with pytest.raises(AnelabError, match="has role 'layout' and needs a target"):
        Subject("cat", role="layout")


def test_tokens_suppress_and_layout_gather_into_one_value():
    subjects = gather(tokens=["cat"], suppress=["dog"], layout={"cat": (0.2, 0.5), "bird": (0.8, 0.5)})
    assert subjects == (
        Subject("cat", target=(0.2, 0.5)),
        Subject("dog", role="suppress"),
        Subject("bird", role="layout", target=(0.8, 0.5)),
    )
    with pytest.raises(AnelabError, match="is also suppressed"):
        gather(suppress=["dog"], layout={"dog": (0.5, 0.5)})


def test_a_modifier_word_binds_to_the_occurrence_nearest_its_noun(tokenizer):
    prompt = "a blue clock and a blue apple"  # blue at 2 and 6, clock 3, apple 7
    resolved = resolve(tokenizer, prompt, [Subject("clock", ("blue",)), Subject("apple", ("blue",))])
    assert resolved == (SubjectPosition(3, (2,)), SubjectPosition(7, (6,)))
    with pytest.raises(AnelabError, match="'green' is not a token of"):
        resolve(tokenizer, prompt, [Subject("clock", ("green",))])
    with pytest.raises(AnelabError, match="named twice among the subjects"):
        resolve(tokenizer, "a red apple", [Subject("apple", ("red",)), Subject("red")])


def test_the_benchmark_pairs_follow_from_the_prompt_data():
    assert benchmark_subjects("a monkey and a red car", ["monkey", "car"], ["red"]) == [
        ("monkey", []),
        ("car", ["red"]),
    ]
    prompts = load_prompts()
    coloured = prompts[prompts.subjects.map(lambda s: any(m for _, m in s))]
    assert set(coloured.category) == {"animal_object", "object_object"}
    assert (prompts.category == "object_object").sum() == len(coloured[coloured.category == "object_object"])  # all
    assert all(n == t for s, tokens in zip(prompts.subjects, prompts.tokens) for (n, _), t in zip(s, tokens))


def test_parsing_without_spacy_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)  # as on a machine without it (an import of None fails)
    with pytest.raises(AnelabError, match="parsing subjects needs spaCy \\(pip install spacy"):
        parse_subjects("a red apple and a blue bowl")
