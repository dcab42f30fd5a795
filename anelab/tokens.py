"""Words ↔ CLIP token positions (``<sot>`` = 0), as A&E's ``token_indices`` expect (reference §7.12)."""

from __future__ import annotations

from collections.abc import Sequence

from .errors import AnelabError


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` with ``<sot>`` and ``<eot>``, untruncated; too long is an error."""
    ids = tokenizer(prompt, truncation=False, add_special_tokens=True).input_ids
    limit = tokenizer.model_max_length
    if len(ids) > limit:
        raise AnelabError(
            f"prompt is {len(ids)} tokens long, the text encoder takes at most {limit} (incl. <sot> and <eot>): {prompt!r}"
        )
    return ids


def prompt_tokens(tokenizer, prompt: str) -> dict[int, str]:
    """``{position: token}`` for the prompt's own tokens (between ``<sot>`` and ``<eot>``)."""
    ids = prompt_ids(tokenizer, prompt)
    pieces = tokenizer.convert_ids_to_tokens(ids[1:-1])
    return {i + 1: piece.replace("</w>", "") for i, piece in enumerate(pieces)}


def eot_index(tokenizer, prompt: str) -> int:
    """Position of ``<eot>`` in the padded sequence."""
    return len(prompt_ids(tokenizer, prompt)) - 1


def _listing(tokens: dict[int, str]) -> str:
    return " ".join(f"{i}:{t}" for i, t in tokens.items())


def resolve_tokens(tokenizer, prompt: str, tokens: Sequence[str | int]) -> list[int]:
    """Subject words or positions → positions; a missing, repeated or special token is an error naming the prompt's tokens."""
    if isinstance(tokens, (str, int)):
        tokens = [tokens]
    available = prompt_tokens(tokenizer, prompt)
    positions = []
    for token in tokens:
        if isinstance(token, bool) or not isinstance(token, (str, int)):
            raise AnelabError(f"tokens must be words or int positions, got {token!r}")
        if isinstance(token, int):
            if token not in available:
                raise AnelabError(
                    f"token position {token} is not a word of the prompt (allowed 1..{len(available)}; "
                    f"0 is <sot>, {len(available) + 1}+ are <eot>/padding); the prompt's tokens are {_listing(available)}"
                )
            positions.append(token)
            continue
        word = token.strip().lower()
        hits = [i for i, t in available.items() if t == word]
        if not hits:
            raise AnelabError(f"{token!r} is not a token of {prompt!r}; its tokens are {_listing(available)}")
        if len(hits) > 1:
            raise AnelabError(
                f"{token!r} appears {len(hits)} times in {prompt!r} (positions {hits}); pass the position instead"
            )
        positions.append(hits[0])
    if len(set(positions)) != len(positions):
        raise AnelabError(f"tokens name the same position twice: {list(tokens)!r} -> {positions}")
    return positions
