"""Attend-and-Excite (Chefer et al., SIGGRAPH 2023), with the suppression and layout terms of STUDIES.md 05.

Official code: yuval-alaluf/Attend-and-Excite, ``pipeline_attend_and_excite.py`` (reference
attend_and_excite.md §1): the smoothed max of each subject's re-normalised map at ``attention_res``, the loss
``max_s max(0, 1 − m_s)``, α_i = 20·√r_i for i < 25, refinement at {0: 0.05, 10: 0.5, 20: 0.8} (at most 20
updates) while the loss measured before each update is above ``1 − threshold``.

Suppression (a subject with ``role="suppress"``) adds ``suppress_scale · max_u max(0, m_u − suppress_bound)``;
a layout target adds ``layout_scale · Σ KL(A ‖ N(G, σ²))`` (``layout_update="joint"``) or moves the latent by
its own gradient first (``"two_stage"``, the original study's update). ``GuidanceConfig`` is this method's
settings and the method itself: ``anelab.methods.get("attend_and_excite")`` is ``GuidanceConfig()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

import torch

from ..checks import is_number
from ..config import DEFAULT_THRESHOLDS
from ..errors import AnelabError
from ..objectives import excite_loss, layout_kl, suppress_loss
from ..subjects import SubjectPositions
from .base import KEYS, AtResolution, IndexSteps, Inputs, Thresholds, TokenSoftmax


@dataclasses.dataclass(frozen=True)
class GuidanceConfig(TokenSoftmax, Thresholds, IndexSteps, AtResolution):
    """Attend-and-Excite settings (reference §1.1). Loop index ``i`` counts iterations over ``scheduler.timesteps``
    (SD-1.4 PNDM with 50 steps has 51)."""

    name = "attend_and_excite"
    label = "A&E"
    paper = "Chefer et al., Attend-and-Excite, SIGGRAPH 2023"
    official = "yuval-alaluf/Attend-and-Excite, pipeline_attend_and_excite.py"
    trace_loss = "excite"

    thresholds: Mapping[int, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_THRESHOLDS), metadata=KEYS)
    suppress_scale: float = 1.0  # step size of the suppression term, relative to α_i (STUDIES.md 05)
    suppress_bound: float = 0.2  # suppressed tokens are pushed down only while their smoothed max exceeds this
    layout_scale: float = 1.0  # step size of the layout KL term, relative to α_i
    layout_sigma: float = 0.15  # width of the layout target Gaussian, in image widths
    layout_update: Literal["joint", "two_stage"] = (
        "joint"  # joint: one gradient of the summed objective; two_stage: the original study's δ then A&E at L + δ
    )

    def _check(self):
        for name in ("suppress_scale", "layout_scale"):
            if not is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise AnelabError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        if not is_number(self.suppress_bound) or not 0 <= self.suppress_bound <= 1:
            raise AnelabError(f"suppress_bound must lie in [0, 1], got {self.suppress_bound!r}")
        if not is_number(self.layout_sigma) or self.layout_sigma <= 0:
            raise AnelabError(
                f"layout_sigma must be a positive number (image widths, e.g. 0.15), got {self.layout_sigma!r}"
            )
        if self.layout_update not in ("joint", "two_stage"):
            raise AnelabError(f"layout_update must be one of ('joint', 'two_stage'), got {self.layout_update!r}")

    def check_subjects(self, subjects: SubjectPositions, words: dict[int, str]) -> None:
        if not subjects:
            raise AnelabError(
                "guidance needs subject tokens (tokens=[...]), suppress=[...] or layout={...}; use config=None for plain SD"
            )

    def measured(self, subjects: SubjectPositions) -> tuple[list[int], list[str]]:
        """Excited, then suppressed, then layout-only nouns (modifiers are not read): the columns of ``m``."""
        ordered = [s for role in ("excite", "suppress", "layout") for s in subjects if s.role == role]
        return [s.noun for s in ordered], [s.role for s in ordered]

    def terms(self, inputs: Inputs) -> dict:
        """``max_attention`` [B, T] of the measured tokens, ``excite`` [B] (the A&E loss), ``suppress`` [B],
        ``layout_kl`` [B, T] (NaN off layout tokens), ``_layout`` [B] (its scaled sum) and ``loss`` [B]."""
        positions, roles = self.measured(inputs.subjects)
        maps = self.token_maps(inputs.cross[self.attention_res], positions, inputs)  # [B, T, h, w]
        m = maps.flatten(2).amax(dim=-1)
        n_excite, n_suppress = roles.count("excite"), roles.count("suppress")
        excite = excite_loss(m[:, :n_excite]) if n_excite else m.new_zeros(len(m))
        terms, loss = {"max_attention": m, "excite": excite}, excite
        if n_suppress:
            suppressed = m[:, n_excite : n_excite + n_suppress]
            terms["suppress"] = suppress_loss(suppressed, self.suppress_bound)
            terms["_suppressed_max"] = suppressed.amax(dim=-1)
            loss = loss + self.suppress_scale * terms["suppress"]
        by_noun = {s.noun: s for s in inputs.subjects}
        columns = [k for k, p in enumerate(positions) if by_noun[p].target is not None]
        if columns:
            kl = layout_kl(torch.stack([maps[:, k] for k in columns], dim=1), inputs.targets)  # [B, L]
            none = torch.full_like(m[:, 0], float("nan"))
            terms["layout_kl"] = torch.stack(
                [kl[:, columns.index(k)] if k in columns else none for k in range(len(positions))], dim=1
            )
            terms["_layout"] = self.layout_scale * kl.sum(dim=-1)
            if self.layout_update == "joint":  # two_stage: the KL moves the latent first, in its own step
                loss = loss + terms["_layout"]
        terms["loss"] = loss
        return terms

    def violates(self, terms: dict, threshold: float) -> torch.Tensor:
        """An excited token below ``threshold``, or a suppressed one above ``max(suppress_bound, 1 − threshold)``."""
        out = terms["excite"] > max(0.0, 1.0 - threshold)
        if "_suppressed_max" in terms:
            out = out | (terms["_suppressed_max"] > max(self.suppress_bound, 1.0 - threshold))
        return out

    def stages(self, subjects: SubjectPositions = ()) -> tuple[str, ...]:
        """``two_stage`` with layout targets: the layout term's step first, then A&E's at the moved latent."""
        if self.layout_update == "two_stage" and any(s.target is not None for s in subjects):
            return ("_layout", "loss")
        return ("loss",)


AttendAndExcite = GuidanceConfig
