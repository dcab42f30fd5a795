"""`GuidanceConfig`: every Attend-and-Excite knob, defaults = official code for SD 1.x.

Reference: attend_and_excite.md §1.1 (defaults), §1.3 (token columns), §1.4 (σ convention),
§1.5 (step sizes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, Union

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


@dataclasses.dataclass(frozen=True)
class GuidanceConfig:
    """Attend-and-Excite settings (reference §1.1). Loop index ``i`` counts iterations
    over ``scheduler.timesteps`` (SD-1.4 PNDM with 50 steps has 51)."""

    attention_res: int = 16  # side of the attention maps the loss reads (8/16/32/64 at 512 px)
    thresholds: Mapping[int, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    scale_factor: float = 20.0  # base step size α
    scale_range: tuple[float, float] = (1.0, 0.5)  # r_i = linspace(*scale_range, n_iterations)[i]
    step_schedule: StepSchedule = "sqrt"  # α_i = scale_factor · schedule(r_i)
    max_iter_to_alter: int | None = DEFAULT_MAX_ITER_TO_ALTER  # regular updates while i < this; None = every iteration
    max_refinement_steps: int = 20  # cap on refinement updates per threshold step (§1.8)
    smooth: bool = True  # Gaussian smoothing of each token map before the max
    kernel_size: int = 3  # odd; reflect padding kernel_size // 2
    sigma: float = 0.5
    sigma_convention: Literal["legacy", "standard"] = "legacy"  # legacy: exp(-((x-μ)/(2σ))²) (§1.4)
    softmax_tokens: Literal["legacy", "prompt", "padded"] = (
        "legacy"  # legacy: the official code's columns for the model (SD 1.x 1..75; SD 2.x, SDXL: prompt); prompt: 1..eot-1; padded: 1..75 (§1.3, anelab.models.softmax_tokens)
    )
    temperature: float = 100.0  # the ×100 before the token softmax (§1.3)
    suppress_scale: float = 1.0  # step size of the suppression term, relative to α_i (STUDIES.md 05)
    suppress_bound: float = 0.2  # suppressed tokens are pushed down only while their smoothed max exceeds this
    layout_scale: float = 1.0  # step size of the layout KL term, relative to α_i
    layout_sigma: float = 0.15  # width of the layout target Gaussian, in image widths
    layout_update: Literal["joint", "two_stage"] = (
        "joint"  # joint: one gradient of the summed objective; two_stage: the original study's δ then A&E at L + δ
    )

    def __post_init__(self):
        if isinstance(self.attention_res, bool) or not isinstance(self.attention_res, int) or self.attention_res < 1:
            raise AnelabError(
                f"attention_res must be a positive int (8, 16, 32 or 64 at 512 px), got {self.attention_res!r}"
            )
        thresholds = _check_thresholds(self.thresholds)
        object.__setattr__(self, "thresholds", thresholds)
        if not is_number(self.scale_factor) or self.scale_factor < 0:
            raise AnelabError(f"scale_factor must be a number >= 0, got {self.scale_factor!r}")
        if (
            not isinstance(self.scale_range, (tuple, list))
            or len(self.scale_range) != 2
            or not all(is_number(v) and v >= 0 for v in self.scale_range)
        ):
            raise AnelabError(f"scale_range must be two numbers >= 0 (start, end), got {self.scale_range!r}")
        object.__setattr__(self, "scale_range", tuple(float(v) for v in self.scale_range))
        object.__setattr__(self, "step_schedule", _check_schedule(self.step_schedule))
        if self.max_iter_to_alter is not None and (not is_int(self.max_iter_to_alter) or self.max_iter_to_alter < 0):
            raise AnelabError(f"max_iter_to_alter must be an int >= 0 or None, got {self.max_iter_to_alter!r}")
        if not is_int(self.max_refinement_steps) or self.max_refinement_steps < 0:
            raise AnelabError(f"max_refinement_steps must be an int >= 0, got {self.max_refinement_steps!r}")
        if not is_int(self.kernel_size) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise AnelabError(f"kernel_size must be a positive odd int (3, 5, 7, ...), got {self.kernel_size!r}")
        if not is_number(self.sigma) or self.sigma <= 0:
            raise AnelabError(f"sigma must be a number > 0, got {self.sigma!r}")
        for name, allowed in (
            ("sigma_convention", ("legacy", "standard")),
            ("softmax_tokens", ("legacy", "prompt", "padded")),
            ("layout_update", ("joint", "two_stage")),
        ):
            if getattr(self, name) not in allowed:
                raise AnelabError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not is_number(self.temperature) or self.temperature <= 0:
            raise AnelabError(f"temperature must be a number > 0, got {self.temperature!r}")
        for name in ("suppress_scale", "layout_scale"):
            if not is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise AnelabError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        if not is_number(self.suppress_bound) or not 0 <= self.suppress_bound <= 1:
            raise AnelabError(f"suppress_bound must lie in [0, 1], got {self.suppress_bound!r}")
        if not is_number(self.layout_sigma) or self.layout_sigma <= 0:
            raise AnelabError(
                f"layout_sigma must be a positive number (image widths, e.g. 0.15), got {self.layout_sigma!r}"
            )

    def step_sizes(self, n_iterations: int) -> np.ndarray:
        """α_i for every loop index (§1.5): ``scale_factor · schedule(linspace(*scale_range, n))``."""
        r = np.linspace(self.scale_range[0], self.scale_range[1], n_iterations)
        if isinstance(self.step_schedule, tuple):  # a table of segments over the loop index
            steps, values = zip(*self.step_schedule)
            multiplier = np.interp(np.arange(n_iterations), steps, values)
        else:
            schedule = STEP_SCHEDULES[self.step_schedule] if isinstance(self.step_schedule, str) else self.step_schedule
            multiplier = np.asarray(schedule(r), dtype=np.float64)
        if multiplier.shape != r.shape or not np.all(np.isfinite(multiplier)):
            raise AnelabError("step_schedule must map an array of r values to finite multipliers of the same shape")
        return self.scale_factor * multiplier

    def last_update_iteration(self, n_iterations: int) -> int:
        """Number of leading loop iterations that get a regular update (``i < this``)."""
        return n_iterations + 1 if self.max_iter_to_alter is None else self.max_iter_to_alter

    def check_schedule(self, n_iterations: int) -> None:
        """Threshold steps must exist in a schedule of ``n_iterations`` loop iterations."""
        late = sorted(i for i in self.thresholds if i >= n_iterations)
        if late:
            raise AnelabError(
                f"threshold steps {late} are beyond the schedule: it has {n_iterations} loop iterations (0..{n_iterations - 1}); "
                f"config.rescaled({DEFAULT_STEPS}, n) moves a {DEFAULT_STEPS}-step schedule to n steps"
            )

    def rescaled(self, n_from: int, n_to: int) -> "GuidanceConfig":
        """The same schedule for ``n_to`` inference steps instead of ``n_from``: threshold steps,
        ``max_iter_to_alter`` and a table schedule's loop indices scale proportionally (loop index ``i`` → ``round(i · n_to / n_from)``,
        at most ``n_to``, the last loop index of a PNDM schedule)."""
        if n_from == n_to:
            return self

        def scale(i: int) -> int:
            return int(round(i * n_to / n_from))

        thresholds: dict[int, float] = {}
        for step, value in self.thresholds.items():  # steps that land on one index keep the later threshold
            thresholds[min(scale(step), n_to)] = value
        limit = None if self.max_iter_to_alter is None else scale(self.max_iter_to_alter)
        schedule = self.step_schedule
        if isinstance(schedule, tuple):  # a table of segments is written in loop indices too
            schedule = tuple(dict((min(scale(i), n_to), v) for i, v in schedule).items())
        return self.replace(thresholds=thresholds, max_iter_to_alter=limit, step_schedule=schedule)

    def replace(self, **changes) -> "GuidanceConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain, JSON-able description; :meth:`from_dict` rebuilds the config from it (a callable schedule
        is written by its name and cannot be rebuilt: use a named schedule or a table of segments)."""
        out = dataclasses.asdict(self)
        out["thresholds"] = {int(k): float(v) for k, v in self.thresholds.items()}
        out["scale_range"] = list(self.scale_range)
        if callable(self.step_schedule):
            out["step_schedule"] = getattr(self.step_schedule, "__name__", repr(self.step_schedule))
        elif isinstance(self.step_schedule, tuple):
            out["step_schedule"] = [list(point) for point in self.step_schedule]
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> "GuidanceConfig":
        """The inverse of :meth:`to_dict`, also after a JSON round trip (threshold keys come back as text)."""
        fields = dict(data)
        if isinstance(fields.get("thresholds"), Mapping):
            fields["thresholds"] = {
                int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in fields["thresholds"].items()
            }
        if isinstance(fields.get("scale_range"), list):
            fields["scale_range"] = tuple(fields["scale_range"])
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise AnelabError(f"not GuidanceConfig fields: {unknown}")
        return cls(**fields)


def _check_schedule(schedule) -> StepSchedule:
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


def _check_thresholds(thresholds) -> dict[int, float]:
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
    """``"0:0.05,10:0.5,20:0.8"`` → ``{0: 0.05, 10: 0.5, 20: 0.8}``; ``""`` → ``{}``."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            step, value = part.split(":")
            out[int(step)] = float(value)
        except ValueError:
            raise AnelabError(f"thresholds must look like '0:0.05,10:0.5,20:0.8', got {text!r}") from None
    return _check_thresholds(out)
