"""Subjects: what guidance acts on — a noun with its modifiers (attribute words) and its role — as one value.

A :class:`Subject` is given in words or CLIP positions (``<sot>`` = 0): ``("apple", ["red"])``, ``"cat"``, ``3``,
``Subject("dog", role="suppress")`` or ``Subject("cat", target=(0.8, 0.5))`` (a layout target: x right, y down,
in [0, 1]). Roles: ``excite`` (the default), ``suppress`` (push its attention down) and ``layout`` (only pulled
to its target). :func:`resolve` turns them into :class:`SubjectPosition` values against a prompt; the
methods compute on those (``anelab.methods``), the trace and the store identity name them.

A modifier word resolves to its occurrence nearest its noun (before it first), so ``"a blue clock and a blue
apple"`` binds each ``blue`` to its own noun. For the A&E benchmark prompts the pairs follow from the prompt
data (:func:`benchmark_subjects`: a colour right before its object); :func:`parse_subjects` asks spaCy,
when it and an English model are installed (an optional extra: ``pip install spacy``, then
``python -m spacy download en_core_web_sm``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from .checks import is_int, is_number
from .errors import AnelabError
from .tokens import prompt_tokens, resolve_tokens

ROLES = ("excite", "suppress", "layout")


@dataclasses.dataclass(frozen=True)
class Subject:
    """A noun (word or position), its modifiers, its role and an optional layout target ``(x, y)``."""

    noun: str | int
    modifiers: tuple[str | int, ...] = ()
    role: str = "excite"
    target: tuple[float, float] | None = None

    def __post_init__(self):
        if isinstance(self.noun, bool) or not isinstance(self.noun, (str, int)):
            raise AnelabError(f"a subject's noun must be a word or a CLIP position, got {self.noun!r}")
        modifiers = (self.modifiers,) if isinstance(self.modifiers, (str, int)) else tuple(self.modifiers)
        if any(isinstance(m, bool) or not isinstance(m, (str, int)) for m in modifiers):
            raise AnelabError(f"modifiers of {self.noun!r} must be words or CLIP positions, got {self.modifiers!r}")
        object.__setattr__(self, "modifiers", modifiers)
        if self.role not in ROLES:
            raise AnelabError(f"a subject's role must be one of {ROLES}, got {self.role!r}")
        if self.target is not None:
            object.__setattr__(self, "target", layout_point(self.noun, self.target))
            if self.role == "suppress":
                raise AnelabError(
                    f"subject {self.noun!r} is suppressed; a suppressed subject cannot have a layout target"
                )
        elif self.role == "layout":
            raise AnelabError(f"subject {self.noun!r} has role 'layout' and needs a target (x, y)")


@dataclasses.dataclass(frozen=True)
class SubjectPosition:
    """A :class:`Subject` resolved against a prompt: CLIP positions, role, target."""

    noun: int
    modifiers: tuple[int, ...] = ()
    role: str = "excite"
    target: tuple[float, float] | None = None


SubjectPositions = tuple[SubjectPosition, ...]


def layout_point(token, point) -> tuple[float, float]:
    """A layout target ``(x, y)`` with 0 <= x, y <= 1 (x right, y down), or a one-line error (the one check of a point)."""
    ok = isinstance(point, (tuple, list)) and len(point) == 2 and all(is_number(v) and 0 <= v <= 1 for v in point)
    if not ok:
        raise AnelabError(
            f"layout point for {token!r} must be (x, y) with 0 <= x, y <= 1 (x right, y down), got {point!r}"
        )
    return float(point[0]), float(point[1])


def as_subject(item) -> Subject:
    """One subject from what a user writes: a word or position, ``(noun, [modifiers])``, a dict or a Subject."""
    if isinstance(item, Subject):
        return item
    if isinstance(item, (str, int)) and not isinstance(item, bool):
        return Subject(item)
    if isinstance(item, Mapping):
        unknown = set(item) - {"noun", "modifiers", "role", "target"}
        if unknown or "noun" not in item:
            raise AnelabError(f"a subject dict has keys noun, modifiers, role, target; got {dict(item)!r}")
        target = item.get("target")
        return Subject(item["noun"], tuple(item.get("modifiers") or ()), item.get("role", "excite"), target)
    if isinstance(item, (tuple, list)) and len(item) == 2 and not isinstance(item[1], (int, float, bool)):
        noun, modifiers = item
        return Subject(noun, (modifiers,) if isinstance(modifiers, str) else tuple(modifiers or ()))
    raise AnelabError(
        f"a subject is a word, a CLIP position, (noun, [modifiers]), a dict or anelab.subjects.Subject; got {item!r}"
    )


def gather(*, tokens=(), subjects=None, suppress=(), layout=None) -> tuple[Subject, ...]:
    """One tuple of subjects from ``generate``'s arguments: ``subjects=[...]`` or ``tokens=[...]`` (excited),
    plus ``suppress=[...]`` and ``layout={token: (x, y)}`` (a layout token that is excited keeps its role)."""
    if isinstance(tokens, (str, int)):
        tokens = [tokens]
    if isinstance(suppress, (str, int)):
        suppress = [suppress]
    if subjects is not None and list(tokens):
        raise AnelabError(
            "give tokens=[...] or subjects=[...], not both (subjects=[(noun, [modifiers])] names the tokens)"
        )
    if subjects is None:
        items = [Subject(t) for t in tokens]
    elif isinstance(subjects, (str, int, Subject, Mapping)):
        items = [as_subject(subjects)]
    elif isinstance(subjects, Sequence):
        items = [as_subject(s) for s in subjects]
    else:
        raise AnelabError(f"subjects must be a list of subjects, e.g. [('apple', ['red']), 'bowl'], got {subjects!r}")
    items += [Subject(t, role="suppress") for t in suppress]
    if layout is None:
        layout = {}
    if not isinstance(layout, Mapping):
        raise AnelabError(f"layout must be a dict {{token: (x, y)}} with x, y in [0, 1], got {layout!r}")
    for token, point in layout.items():
        same = [k for k, s in enumerate(items) if s.noun == token]
        if same and items[same[0]].role == "suppress":
            raise AnelabError(
                f"layout token {token!r} is also suppressed; a suppressed token cannot have a layout target"
            )
        if same:
            items[same[0]] = dataclasses.replace(items[same[0]], target=point)
        else:
            items.append(Subject(token, role="layout", target=point))
    return tuple(items)


def resolve(tokenizer, prompt: str, subjects: Sequence[Subject]) -> SubjectPositions:
    """Subjects → positions in ``prompt``; a word missing or repeated, or a position used twice, is one clear error."""
    words = prompt_tokens(tokenizer, prompt)
    out, used = [], {}
    for subject in subjects:
        noun = resolve_tokens(tokenizer, prompt, [subject.noun])[0]
        modifiers = tuple(_modifier(tokenizer, prompt, words, m, noun) for m in subject.modifiers)
        for position in (noun, *modifiers):
            if position in used:
                if sorted({used[position], subject.role}) == ["excite", "suppress"]:
                    raise AnelabError(
                        f"token(s) {[words[position]]} are both excited (tokens=) and suppressed (suppress=); "
                        "a token can only be one"
                    )
                raise AnelabError(
                    f"token {words[position]!r} (position {position}) is named twice among the subjects; "
                    "a token can only be one subject's noun or modifier"
                )
            used[position] = subject.role
        out.append(SubjectPosition(noun, modifiers, subject.role, subject.target))
    return tuple(out)


def _modifier(tokenizer, prompt: str, words: dict[int, str], modifier, noun: int) -> int:
    """A modifier's position: an int as given, a word at its occurrence nearest ``noun`` (before it first)."""
    if is_int(modifier):
        return resolve_tokens(tokenizer, prompt, [modifier])[0]
    word = modifier.strip().lower()
    hits = [i for i, t in words.items() if t == word and i != noun]
    if not hits:
        listing = " ".join(f"{i}:{t}" for i, t in words.items())
        raise AnelabError(f"modifier {modifier!r} is not a token of {prompt!r}; its tokens are {listing}")
    return min(hits, key=lambda i: (abs(i - noun), i > noun))


def benchmark_subjects(prompt: str, nouns: Sequence[str], attributes: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The A&E benchmark's subjects of ``prompt``: each noun of ``nouns`` with the attribute word right before it
    (``"a monkey and a red car"`` → ``[("monkey", []), ("car", ["red"])]``), in prompt order."""
    words = prompt.lower().split()
    return [(w, [words[k - 1]] if k and words[k - 1] in attributes else []) for k, w in enumerate(words) if w in nouns]


def parse_subjects(prompt: str, model: str = "en_core_web_sm") -> list[tuple[str, list[str]]]:
    """Nouns and their modifiers from a spaCy dependency parse (SynGen's rule: a noun's ``amod``, ``compound``,
    ``nmod``, ``npadvmod``, ``advmod`` and ``acomp`` children, through ``conj``). Needs spaCy and ``model``."""
    try:
        import spacy
    except ImportError:
        raise AnelabError(
            "parsing subjects needs spaCy (pip install spacy; python -m spacy download en_core_web_sm); "
            "or give subjects=[(noun, [modifiers])], or use benchmark_subjects for the A&E prompts"
        ) from None
    try:
        nlp = spacy.load(model)
    except OSError:
        raise AnelabError(
            f"spaCy has no model {model!r} here (python -m spacy download {model}); "
            "or give subjects=[(noun, [modifiers])]"
        ) from None
    labels = {"amod", "compound", "nmod", "npadvmod", "advmod", "acomp"}
    out = []
    for token in nlp(prompt):
        if token.pos_ not in ("NOUN", "PROPN"):
            continue
        modifiers, stack = [], list(token.children)
        while stack:
            child = stack.pop(0)
            if child.dep_ in labels:
                modifiers.append(child)
                stack += [c for c in child.children if c.dep_ == "conj"]
        out.append((token.text, [m.text for m in sorted(modifiers, key=lambda m: m.i)]))
    return out
