"""The method protocol: what an attention-guidance method declares, computes and decides (DESIGN.md, third round).

A method is one frozen dataclass: its fields are its settings (``to_dict()`` is its store identity and its
CUDA-graph key, so no list of fields is kept by hand anywhere), its methods are its behaviour:

- :meth:`Method.reads` — which maps one conditional forward must provide (cross-attention at which
  resolutions, self-attention);
- :meth:`Method.terms` — its objective on those maps, as pure tensor code (no host synchronisation, so a
  CUDA graph can capture it): ``terms["loss"]`` [B] is what the latent update descends, the other keys are
  its named terms ([B] per sample, or [B, T] per measured token), ``terms["state"]`` what it carries to the
  next step (``previous`` of every measurement of the next guided step: the state of this step's last
  measurement), or to the next measurement (``state_per_measurement``: InitNO's EMA);
- :meth:`Method.updates`, :meth:`Method.step_sizes`, :meth:`Method.refinement`, :meth:`Method.violates` —
  when it moves the latent, by how much, and when and how long it refines;
- optionally ``optimise_noise`` — acting on the initial noise before denoising (InitNO).

The sampler (:mod:`anelab.pipeline`) knows nothing else about a method. The mixins below hold the settings
several methods share (A&E's index step rule, thresholded refinement, the token softmax and smoothing); a
method declares only the settings it uses, so a setting of another method is an error. Field metadata
marks what :meth:`Method.rescaled` moves with the step count (loop indices) and what
:meth:`Method.at_scale` moves with the model's image side (attention resolutions).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from ..checks import is_int, is_number
from ..config import STEP_SCHEDULES, StepSchedule, check_schedule, check_thresholds
from ..errors import AnelabError
from ..subjects import SubjectPositions

#: Field metadata: how a setting moves when the step count changes (``loop``) or the model's side does (``res``).
INDEX = {"loop": "index"}  # an int loop index (or None)
KEYS = {"loop": "keys"}  # a mapping keyed by loop index
INDICES = {"loop": "indices"}  # a tuple of loop indices
TABLE = {"loop": "table"}  # a step schedule: a table [(loop index, value), ...] moves, a name does not
RES = {"res": True}  # an attention resolution, or a tuple of them


@dataclasses.dataclass(frozen=True)
class Reads:
    """What one measurement reads: cross-attention at ``cross`` (mean over every layer and head there, the
    first resolution is the method's main one), self-attention at ``self_attention``."""

    cross: tuple[int, ...]
    self_attention: tuple[int, ...] = ()


@dataclasses.dataclass
class Inputs:
    """What :meth:`Method.terms` computes on: the maps of one conditional forward and the run's subjects.

    ``cross[res]`` [B, h, w, S] and ``self_attention[res]`` [B, h, w, h·w] are means over the layers and heads at
    that resolution; ``columns`` the token-softmax columns this model means by ``softmax_tokens="legacy"``
    (:func:`anelab.models.softmax_tokens`); ``previous`` the ``terms["state"]`` of the step before (None at the
    first guided step); ``targets`` the layout targets [L, h, w] on the main grid, in layout order."""

    cross: dict[int, torch.Tensor]
    subjects: SubjectPositions
    eot: int
    step: int = 0
    num_steps: int = 50
    self_attention: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    previous: dict | None = None
    targets: torch.Tensor | None = None
    columns: str = "legacy"


@dataclasses.dataclass(frozen=True)
class Method:
    """Base of every method (module docstring). Subclasses are frozen dataclasses of settings."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # for legends: "A&E", "D&B", ...
    paper: ClassVar[str] = ""
    official: ClassVar[str] = ""  # repository and file the implementation follows
    binding: ClassVar[bool] = False  # needs subjects with modifiers (attribute words)
    refine_term: ClassVar[str] = "loss"  # the term refinement descends
    trace_loss: ClassVar[str] = "loss"  # the term shown in the trace's ``loss`` column
    state_per_measurement: ClassVar[bool] = False  # terms["state"] moves at every measurement (else once per step)

    def __post_init__(self):
        for cls in reversed(type(self).__mro__):  # every mixin checks its own settings, base first
            check = cls.__dict__.get("_check")
            if check is not None:
                check(self)

    # -- the settings as one value ----------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain, JSON-able settings: the method's store identity and CUDA-graph key. A callable step schedule is
        written by its name (and cannot be rebuilt)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("loop") == "keys":
                value = {int(k): float(v) for k, v in value.items()}
            elif f.metadata.get("loop") == "table" and callable(value):
                value = getattr(value, "__name__", repr(value))
            out[f.name] = _plain(value)
        return out

    def key(self) -> str:
        """:meth:`to_dict` as canonical JSON (hashable: the graph key, with the method's name)."""
        return json.dumps({"method": self.name, **self.to_dict()}, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping) -> "Method":
        """The inverse of :meth:`to_dict`, also after a JSON round trip (loop-index keys come back as text)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise AnelabError(
                f"{cls.name} has no setting(s) {unknown}; its settings are: {', '.join(fields)} "
                "(see anelab.methods.describe_settings)"
            )
        values = {}
        for name, value in data.items():
            kind = fields[name].metadata.get("loop")
            if kind == "keys" and isinstance(value, Mapping):
                value = {int(k) if isinstance(k, str) and k.strip().isdigit() else k: v for k, v in value.items()}
            elif isinstance(value, list):
                value = _tuple(value)
            values[name] = value
        return cls(**values)

    def replace(self, **changes) -> "Method":
        """A copy with some settings changed (validated again; an unknown setting is an error listing the known)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise AnelabError(f"{self.name} has no setting(s) {unknown}; its settings are: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)

    def rescaled(self, n_from: int, n_to: int) -> "Method":
        """The same schedule for ``n_to`` inference steps instead of ``n_from``: every loop-index setting (threshold
        steps, ``max_iter_to_alter``, a table schedule, a method's own steps) scales proportionally, loop index
        ``i`` → ``round(i · n_to / n_from)``, at most ``n_to`` (the last loop index of a PNDM schedule); indices
        that land on one keep the later value."""
        if n_from == n_to:
            return self
        return self.remapped(
            lambda i: min(int(round(i * n_to / n_from)), n_to), index=lambda i: int(round(i * n_to / n_from))
        )

    def remapped(self, place, index=None) -> "Method":
        """Every loop-index setting moved by ``place(i) -> j`` (indices that land on one keep the later value; a single
        index such as ``max_iter_to_alter`` by ``index``, default ``place``): what :meth:`rescaled` does
        proportionally, and what SD 3 / FLUX's σ placement does by noise level (:func:`anelab.mmdit.sigma_placement`)."""
        index = index or place
        changes = {}
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), f.metadata.get("loop")
            if kind == "index" and value is not None:
                changes[f.name] = index(value)
            elif kind == "keys":
                changes[f.name] = {place(k): v for k, v in value.items()}
            elif kind == "indices":
                changes[f.name] = tuple(dict.fromkeys(place(i) for i in value))
            elif kind == "table" and isinstance(value, tuple):
                changes[f.name] = tuple(dict((place(i), v) for i, v in value).items())
        return dataclasses.replace(self, **changes)

    def resolutions(self) -> list[int]:
        """Every attention resolution the method reads (cross and self), the main one first."""
        reads = self.reads()
        return list(dict.fromkeys([*reads.cross, *reads.self_attention]))

    def at_scale(self, factor: float) -> "Method | None":
        """The method with every attention resolution × ``factor`` (:func:`anelab.runs.study.fit_study`), or None
        when one of them is not a whole number then."""
        changes = {}
        for f in dataclasses.fields(self):
            if not f.metadata.get("res"):
                continue
            value = getattr(self, f.name)
            scaled = [r * factor for r in (value if isinstance(value, tuple) else (value,))]
            if any(abs(v - round(v)) > 1e-9 for v in scaled):
                return None
            scaled = [int(round(v)) for v in scaled]
            changes[f.name] = tuple(scaled) if isinstance(value, tuple) else scaled[0]
        return dataclasses.replace(self, **changes) if changes else self

    # -- what it reads and computes (subclasses) ----------------------------------------------------
    def reads(self) -> Reads:
        raise NotImplementedError

    def terms(self, inputs: Inputs) -> dict[str, Any]:
        raise NotImplementedError

    def measured(self, subjects: SubjectPositions) -> tuple[list[int], list[str]]:
        """The token positions the trace has a row for, and their roles: every noun (its role), then the modifiers."""
        positions = [s.noun for s in subjects] + [m for s in subjects for m in s.modifiers]
        roles = [s.role for s in subjects] + ["modifier"] * (len(positions) - len(subjects))
        return positions, roles

    def check_subjects(self, subjects: SubjectPositions, words: dict[int, str]) -> None:
        """Refuse subjects the method cannot use (one line naming what is allowed), before any denoising."""
        if not subjects:
            raise AnelabError(
                f"{self.name} needs subjects (tokens=[...] or subjects=[...]); use config=None for plain SD"
            )
        roles = sorted({s.role for s in subjects} - {"excite"})
        if roles:
            raise AnelabError(
                f"{self.name} excites its subjects; roles {roles} (suppress=, layout=) are attend_and_excite's"
            )
        if self.needs_modifiers() and not any(s.modifiers for s in subjects):
            named = ", ".join(words.get(s.noun, str(s.noun)) for s in subjects)
            raise AnelabError(
                f"{self.name} binds attributes to nouns and needs at least one subject with a modifier, e.g. "
                f"subjects=[('apple', ['red'])]; got subjects {named} without modifiers"
            )

    def needs_modifiers(self) -> bool:
        """Whether the method binds attributes and needs a subject with modifiers."""
        return self.binding

    # -- the loop (defaults: never moves the latent) -------------------------------------------------
    def step_sizes(self, n_iterations: int) -> np.ndarray:
        return np.zeros(n_iterations)

    def updates(self, i: int, n_iterations: int) -> bool:
        """Whether loop index ``i`` gets a regular update."""
        return False

    def refinement(self, i: int) -> tuple[float, int] | None:
        """``(threshold, max iterations)`` at a refinement step, else None."""
        return None

    def guided(self, i: int, n_iterations: int) -> bool:
        """Whether loop index ``i`` measures at all (an update or a refinement step): the sampler skips the rest."""
        return self.updates(i, n_iterations) or self.refinement(i) is not None

    def check_schedule(self, n_iterations: int) -> None:
        """Loop-index settings must exist in a schedule of ``n_iterations`` loop iterations."""

    def violates(self, terms: dict, threshold: float) -> torch.Tensor:
        """[B] bool: the sample needs (more) refinement at a step of ``threshold``."""
        return terms["loss"] > 0

    def stages(self, subjects: SubjectPositions = ()) -> tuple[str, ...]:
        """Terms descended one after another at a regular update, re-measuring between (default: the loss alone)."""
        return ("loss",)

    def phase(self, i: int, n_iterations: int):
        """What of the loop index :meth:`terms` depends on (a CUDA graph of a measurement is keyed by it); None: nothing."""
        return None

    def describe(self) -> str:
        """The settings that differ from the method's defaults, in words a legend can carry."""
        default = type(self)()
        changed = [
            f"{f.name} {_short(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        ]
        return self.label + (f" ({', '.join(changed)})" if changed else "")


# -- settings several methods share ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AtResolution(Method):
    """The attention resolution the objective reads (8/16/32/64 on SD 1.x at 512 px)."""

    attention_res: int = dataclasses.field(default=16, metadata=RES)

    def _check(self):
        res = self.attention_res
        if isinstance(res, bool) or not isinstance(res, int) or res < 1:
            raise AnelabError(f"attention_res must be a positive int (8, 16, 32 or 64 at 512 px), got {res!r}")

    def reads(self) -> Reads:
        return Reads(cross=(self.attention_res,))


@dataclasses.dataclass(frozen=True)
class IndexSteps(Method):
    """A&E's step-size rule on the loop index (reference §1.5): α_i = scale_factor · schedule(linspace(*scale_range, n)[i]),
    regular updates while i < max_iter_to_alter."""

    scale_factor: float = 20.0  # base step size α
    scale_range: tuple[float, float] = (1.0, 0.5)  # r_i = linspace(*scale_range, n_iterations)[i]
    step_schedule: StepSchedule = dataclasses.field(
        default="sqrt", metadata=TABLE
    )  # α_i = scale_factor · schedule(r_i)
    max_iter_to_alter: int | None = dataclasses.field(default=25, metadata=INDEX)  # updates while i < this; None: all

    def _check(self):
        if not is_number(self.scale_factor) or self.scale_factor < 0:
            raise AnelabError(f"scale_factor must be a number >= 0, got {self.scale_factor!r}")
        if (
            not isinstance(self.scale_range, (tuple, list))
            or len(self.scale_range) != 2
            or not all(is_number(v) and v >= 0 for v in self.scale_range)
        ):
            raise AnelabError(f"scale_range must be two numbers >= 0 (start, end), got {self.scale_range!r}")
        object.__setattr__(self, "scale_range", tuple(float(v) for v in self.scale_range))
        object.__setattr__(self, "step_schedule", check_schedule(self.step_schedule))
        if self.max_iter_to_alter is not None and (not is_int(self.max_iter_to_alter) or self.max_iter_to_alter < 0):
            raise AnelabError(f"max_iter_to_alter must be an int >= 0 or None, got {self.max_iter_to_alter!r}")

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

    def updates(self, i: int, n_iterations: int) -> bool:
        return i < self.last_update_iteration(n_iterations)


@dataclasses.dataclass(frozen=True)
class Thresholds(Method):
    """Refinement at threshold steps (reference §1.8): while the sample violates the step's threshold, at most
    ``max_refinement_steps`` updates."""

    thresholds: Mapping[int, float] = dataclasses.field(default_factory=dict, metadata=KEYS)  # loop index -> threshold
    max_refinement_steps: int = 20  # cap on refinement updates per threshold step

    def _check(self):
        object.__setattr__(self, "thresholds", check_thresholds(self.thresholds))
        if not is_int(self.max_refinement_steps) or self.max_refinement_steps < 0:
            raise AnelabError(f"max_refinement_steps must be an int >= 0, got {self.max_refinement_steps!r}")

    def refinement(self, i: int) -> tuple[float, int] | None:
        threshold = self.thresholds.get(i)
        return None if threshold is None else (threshold, self.max_refinement_steps)

    def check_schedule(self, n_iterations: int) -> None:
        super().check_schedule(n_iterations)
        late = sorted(i for i in self.thresholds if i >= n_iterations)
        if late:
            raise AnelabError(
                f"threshold steps {late} are beyond the schedule: it has {n_iterations} loop iterations "
                f"(0..{n_iterations - 1}); config.rescaled(50, n) moves a 50-step schedule to n steps"
            )


@dataclasses.dataclass(frozen=True)
class TokenSoftmax(Method):
    """A&E's token maps (reference §1.3-1.4): drop ``<sot>``, softmax(×temperature) over the text columns,
    Gaussian smoothing of each token's map."""

    smooth: bool = True  # Gaussian smoothing of each token map before the max
    kernel_size: int = 3  # odd; reflect padding kernel_size // 2
    sigma: float = 0.5
    sigma_convention: Literal["legacy", "standard"] = "legacy"  # legacy: exp(-((x-μ)/(2σ))²) (§1.4)
    softmax_tokens: Literal["legacy", "prompt", "padded"] = (
        "legacy"  # legacy: the official code's columns for the model (SD 1.x 1..75; SD 2.x, SDXL: prompt); prompt: 1..eot-1; padded: 1..75 (§1.3)
    )
    temperature: float = 100.0  # the ×100 before the token softmax (§1.3)

    def _check(self):
        if not is_int(self.kernel_size) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise AnelabError(f"kernel_size must be a positive odd int (3, 5, 7, ...), got {self.kernel_size!r}")
        if not is_number(self.sigma) or self.sigma <= 0:
            raise AnelabError(f"sigma must be a number > 0, got {self.sigma!r}")
        for name, allowed in (("sigma_convention", ("legacy", "standard")), ("softmax_tokens", SOFTMAX_TOKENS)):
            if getattr(self, name) not in allowed:
                raise AnelabError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not is_number(self.temperature) or self.temperature <= 0:
            raise AnelabError(f"temperature must be a number > 0, got {self.temperature!r}")

    def token_maps(self, maps: torch.Tensor, positions: list[int], inputs: Inputs) -> torch.Tensor:
        """[B, h, w, S] → [B, T, h, w]: the re-normalised (and smoothed) maps of ``positions`` (§1.3-1.4)."""
        from ..objectives import token_maps

        return token_maps(maps, positions, inputs.eot, self.normalised(inputs.columns))

    def normalised(self, columns: str) -> "TokenSoftmax":
        """This method with ``softmax_tokens`` resolved for the model (``legacy`` → ``columns``)."""
        return self if self.softmax_tokens != "legacy" or columns == "legacy" else self.replace(softmax_tokens=columns)


SOFTMAX_TOKENS = ("legacy", "prompt", "padded")


def with_max_attention(method: Method, terms: dict, inputs: Inputs, normaliser: TokenSoftmax) -> dict:
    """``terms`` with the trace's common measure, ``max_attention`` [B, T] of every measured token (A&E's smoothed max
    under ``normaliser``, or the method's own token maps), where the method does not give its own."""
    if "max_attention" not in terms:
        from ..objectives import token_maps

        positions, _ = method.measured(inputs.subjects)
        main = inputs.cross[method.reads().cross[0]].detach()
        terms["max_attention"] = token_maps(main, positions, inputs.eot, normaliser).flatten(2).amax(-1)
    return terms


def _plain(value):
    """Tuples as lists, recursively (the JSON form)."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _tuple(value):
    """Lists as tuples, recursively (the dataclass form)."""
    return tuple(_tuple(v) for v in value) if isinstance(value, list) else value


def _short(value) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}:{v:g}" for k, v in value.items()) or "none"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)
