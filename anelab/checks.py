"""The small validation rules every module shares: what counts as an int, a number, a seed.

One place, so that "an int but not a bool" or "a finite number" means the same everywhere, and every
refusal is an :class:`AnelabError` saying what was wrong and what is allowed.
"""

from __future__ import annotations

import math
import numbers

from .errors import AnelabError

#: Seeds a ``torch.Generator`` accepts: 0 <= seed < 2**64.
SEED_LIMIT = 2**64


def is_int(value) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite real number (Python or NumPy), not a bool: NaN and ±inf are not numbers here."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def require_int(name: str, value, minimum: int | None = None) -> int:
    """``value`` as an int, or a one-line error naming ``name``."""
    if not is_int(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise AnelabError(f"{name} must be an int{bound}, got {value!r}")
    return int(value)


def require_number(
    name: str, value, minimum: float | None = None, maximum: float | None = None, strict: bool = False
) -> float:
    """``value`` as a finite float within bounds (``strict``: minimum excluded), or a one-line error."""
    ok = is_number(value)
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        bounds = ([f"{'>' if strict else '>='} {minimum:g}"] if minimum is not None else []) + (
            [f"<= {maximum:g}"] if maximum is not None else []
        )
        raise AnelabError(
            f"{name} must be a finite number{' ' + ' and '.join(bounds) if bounds else ''}, got {value!r}"
        )
    return float(value)


def require_seeds(seeds) -> list[int]:
    """A non-empty list of distinct seeds in the generator's range ``0 <= s < 2**64``."""
    if is_int(seeds):
        seeds = [seeds]
    seeds = list(seeds) if hasattr(seeds, "__iter__") and not isinstance(seeds, (str, bytes)) else []
    if not seeds:
        raise AnelabError("seeds must be a non-empty list of ints")
    bad = [s for s in seeds if not is_int(s) or not 0 <= s < SEED_LIMIT]
    if bad:
        raise AnelabError(f"seeds must be ints with 0 <= seed < 2**64 (what torch.Generator accepts), got {bad[:5]!r}")
    if len(set(seeds)) != len(seeds):
        raise AnelabError(f"seeds must be distinct; repeated: {sorted({s for s in seeds if seeds.count(s) > 1})}")
    return [int(s) for s in seeds]
