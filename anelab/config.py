"""Step-size schedules and threshold tables, the settings every index-stepped method shares; and `GuidanceConfig`.

``GuidanceConfig`` — every Attend-and-Excite knob, defaults = the official code for SD 1.x — is the A&E method
of :mod:`anelab.methods.attend_and_excite`; ``anelab.config.GuidanceConfig`` names the same class.
Reference: attend_and_excite.md §1.1 (defaults), §1.3 (token columns), §1.4 (σ convention), §1.5 (step sizes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Union

import numpy as np

from .checks import is_int, is_number
from .errors import AnelabError

#: Named step-size schedules: multiplier as a function of r = linspace(*scale_range)[i].
STEP_SCHEDULES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "sqrt": np.sqrt,  # official code (§1.5): 20·√r, concave
    "linear": lambda r: r,  # what config.py's comment and the paper describe
    "square": np.square,  # convex
    "constant": np.ones_like,  # ignores scale_range
}

#: A name of STEP_SCHEDULES, a callable of r, or a table of segments ``[(loop index, multiplier), ...]``:
#: the multiplier is linear between the listed loop indices and constant beyond the ends (scale_range unused).
StepSchedule = Union[str, Callable[[np.ndarray], np.ndarray], Sequence[tuple[int, float]]]
DEFAULT_STEPS = 50  # the step count the default thresholds and max_iter_to_alter are written for
DEFAULT_THRESHOLDS = {0: 0.05, 10: 0.5, 20: 0.8}
DEFAULT_MAX_ITER_TO_ALTER = 25


def check_schedule(schedule) -> StepSchedule:
    """A known name, a callable, or a table of segments (sorted distinct loop indices, finite multipliers >= 0)."""
    if isinstance(schedule, str):
        if schedule not in STEP_SCHEDULES:
            raise AnelabError(
                f"step_schedule {schedule!r} is unknown; use one of {sorted(STEP_SCHEDULES)}, a callable or a table [[loop index, multiplier], ...]"
            )
        return schedule
    if callable(schedule):
        return schedule
    table = list(schedule) if isinstance(schedule, (list, tuple)) else None
    ok = bool(table) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and is_int(p[0]) and p[0] >= 0 and is_number(p[1]) and p[1] >= 0
        for p in table
    )
    if not ok or [p[0] for p in table] != sorted({p[0] for p in table}):
        raise AnelabError(
            f"step_schedule must be a name, a callable or a table [[loop index, multiplier], ...] with increasing indices, got {schedule!r}"
        )
    return tuple((int(i), float(v)) for i, v in table)


def check_thresholds(thresholds) -> dict[int, float]:
    if not isinstance(thresholds, Mapping):
        raise AnelabError(f"thresholds must be a dict {{loop index: minimum attention}}, got {thresholds!r}")
    out = {}
    for step, value in thresholds.items():
        if not is_int(step) or step < 0:
            raise AnelabError(f"threshold steps must be ints >= 0 (loop indices), got {step!r}")
        if not is_number(value) or not 0 <= value <= 1:
            raise AnelabError(f"thresholds must lie in [0, 1], got {value!r} at step {step}")
        out[int(step)] = float(value)
    return dict(sorted(out.items()))


def parse_thresholds(text: str) -> dict[int, float]:
    """``"0:0.05,10:0.5,20:0.8"`` → ``{0: 0.05, 10: 0.5, 20: 0.8}``; ``""`` → ``{}``; a step given twice is an error."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            step, value = part.split(":")
            step, value = int(step), float(value)
        except ValueError:
            raise AnelabError(f"thresholds must look like '0:0.05,10:0.5,20:0.8', got {text!r}") from None
        if step in out:
            raise AnelabError(f"thresholds give step {step} twice ({out[step]:g} and {value:g}) in {text!r}")
        out[step] = value
    return check_thresholds(out)


def __getattr__(name: str):
    if name == "GuidanceConfig":  # defined beside its objective; imported on first use (no import cycle)
        from .methods.attend_and_excite import GuidanceConfig

        return GuidanceConfig
    raise AttributeError(f"module 'anelab.config' has no attribute {name!r}")
