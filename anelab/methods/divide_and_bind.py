"""Divide-and-Bind (Li et al., BMVC 2023): total variation of each object's map, and a Jensen–Shannon binding of
its attribute's map (mode ``tv_bind``).

Follows boschresearch/Divide-and-Bind, ``divide_and_bind/pipeline_divide_and_bind_latest.py`` (commit 644dfda),
re-implemented from its formulas (the repository is AGPL):

- object maps ``M_s``: A&E's token maps at ``attention_res`` (softmax ×100 over text positions 1..75, the 3×3
  legacy Gaussian); attribute maps ``M_a``: the maps of the ``attribute_res`` layers (64² and 32²) resized to the
  main grid by nearest neighbour (the top-left cell of each block), averaged, then the same normalisation;
- ``TV_s = mean|M[:, :-1] − M[:, 1:]| + mean|M[-1:, :] − M[1:, :]|``: as coded, the second term compares the *last
  row* with rows 1…; ``tv_form="paper"`` takes the vertical neighbour difference ``M[:-1, :] − M[1:, :]``;
- ``tv_bind``: ``p = softmax(vec M_s)``, ``q = softmax(vec(M_a·max M_s / max M_a))``, ``thr = c·max p`` with
  ``c = 0.3`` if ``TV_s < 0.1`` else ``0.2`` (both p and q are cut at p's threshold), ``p, q ← relu(· − thr) + 1e-5``
  (not renormalised), ``bind = w(i)·JSD(p, q)`` with ``w`` = 1, 5, 10 from loop index 0, 10, 20;
- ``l_s = −(TV_s − bind_s)``, loss ``L = max_s l_s``; α_i = 20·√r_i for i < 25; refinement at {0: 0.05, 10: 0.2,
  20: 0.3} while ``min_s TV_s`` is below the threshold, at most 100 updates at loop index 0 and 50 elsewhere.

The call's default mode is ``tv`` (the published examples use ``tv_bind``); one attribute per object.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F

from ..checks import is_int, is_number
from ..errors import AnelabError
from ..subjects import SubjectPositions
from .base import KEYS, RES, AtResolution, IndexSteps, Inputs, Reads, Thresholds, TokenSoftmax


@dataclasses.dataclass(frozen=True)
class DivideAndBind(TokenSoftmax, Thresholds, IndexSteps, AtResolution):
    """Divide-and-Bind settings (official defaults, SD 1.x)."""

    name = "divide_and_bind"
    label = "D&B"
    paper = "Li et al., Divide & Bind Your Attention for Improved Generative Semantic Nursing, BMVC 2023"
    official = "boschresearch/Divide-and-Bind, divide_and_bind/pipeline_divide_and_bind_latest.py"

    mode: Literal["tv", "tv_bind"] = "tv"  # tv: attendance only; tv_bind: + the attribute binding term
    tv_form: Literal["official", "paper"] = "official"  # official: the last row against rows 1.. (as coded)
    thresholds: Mapping[int, float] = dataclasses.field(
        default_factory=lambda: {0: 0.05, 10: 0.2, 20: 0.3}, metadata=KEYS
    )  # refine while min_s TV_s is below
    max_refinement_steps: int = 50  # cap at every refinement step but the first
    max_refinement_steps_first: int = 100  # cap at loop index 0
    attribute_res: tuple[int, ...] = dataclasses.field(default=(64, 32), metadata=RES)  # the attribute maps' layers
    bind_weights: Mapping[int, float] = dataclasses.field(
        default_factory=lambda: {0: 1.0, 10: 5.0, 20: 10.0}, metadata=KEYS
    )  # w(i): from each loop index on
    bind_quantiles: tuple[float, float] = (0.3, 0.2)  # c when TV_s < bind_tv_split, else
    bind_tv_split: float = 0.1

    def _check(self):
        for name, allowed in (("mode", ("tv", "tv_bind")), ("tv_form", ("official", "paper"))):
            if getattr(self, name) not in allowed:
                raise AnelabError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not is_int(self.max_refinement_steps_first) or self.max_refinement_steps_first < 0:
            raise AnelabError(
                f"max_refinement_steps_first must be an int >= 0, got {self.max_refinement_steps_first!r}"
            )
        res = tuple(self.attribute_res) if isinstance(self.attribute_res, (tuple, list)) else (self.attribute_res,)
        if not res or not all(is_int(r) and r >= 1 for r in res):
            raise AnelabError(f"attribute_res must be positive ints (64, 32 at 512 px), got {self.attribute_res!r}")
        object.__setattr__(self, "attribute_res", tuple(int(r) for r in res))
        weights = self.bind_weights
        if (
            not isinstance(weights, Mapping)
            or 0 not in weights
            or not all(is_int(k) and k >= 0 and is_number(v) for k, v in weights.items())
        ):
            raise AnelabError(f"bind_weights must map loop indices (0 among them) to numbers, got {weights!r}")
        object.__setattr__(self, "bind_weights", {int(k): float(v) for k, v in sorted(weights.items())})
        q = self.bind_quantiles
        if not isinstance(q, (tuple, list)) or len(q) != 2 or not all(is_number(v) and 0 <= v <= 1 for v in q):
            raise AnelabError(f"bind_quantiles must be two numbers in [0, 1], got {q!r}")
        object.__setattr__(self, "bind_quantiles", tuple(float(v) for v in q))
        if not is_number(self.bind_tv_split):
            raise AnelabError(f"bind_tv_split must be a number, got {self.bind_tv_split!r}")

    def reads(self) -> Reads:
        extra = self.attribute_res if self.mode == "tv_bind" else ()
        return Reads(cross=(self.attention_res, *[r for r in extra if r != self.attention_res]))

    def check_subjects(self, subjects: SubjectPositions, words: dict[int, str]) -> None:
        super().check_subjects(subjects, words)
        crowded = [words.get(s.noun, str(s.noun)) for s in subjects if len(s.modifiers) > 1]
        if self.mode == "tv_bind" and crowded:
            raise AnelabError(f"divide_and_bind binds one attribute per object; {crowded} have several modifiers")

    def measured(self, subjects: SubjectPositions) -> tuple[list[int], list[str]]:
        if self.mode == "tv":  # modifiers are not read
            return [s.noun for s in subjects], [s.role for s in subjects]
        return super().measured(subjects)

    def refinement(self, i: int) -> tuple[float, int] | None:
        threshold = self.thresholds.get(i)
        if threshold is None:
            return None
        return threshold, self.max_refinement_steps_first if i == 0 else self.max_refinement_steps

    def bind_weight(self, i: int) -> float:
        return self.bind_weights[max(k for k in self.bind_weights if k <= i)]

    def phase(self, i: int, n_iterations: int):
        return self.bind_weight(i) if self.mode == "tv_bind" else None

    def terms(self, inputs: Inputs) -> dict:
        """``tv`` [B, S] per object, ``bind`` [B, S] (``tv_bind`` with an attribute: 0 for an object without), ``loss`` [B]."""
        subjects = inputs.subjects
        maps = self.token_maps(inputs.cross[self.attention_res], [s.noun for s in subjects], inputs)  # [B, S, h, w]
        tv = total_variation(maps, self.tv_form)  # [B, S]
        attendance = tv
        terms = {"tv": tv}
        bound = [k for k, s in enumerate(subjects) if s.modifiers]
        if self.mode == "tv_bind":
            zero = torch.zeros_like(tv[:, 0])
            jsd = None
            if bound:
                attributes = self.attribute_maps(inputs, maps.shape[-2:])  # [B, h, w, 77]
                attribute = self.token_maps(
                    attributes, [subjects[k].modifiers[0] for k in bound], inputs
                )  # [B, A, h, w]
                jsd = binding_divergence(
                    maps[:, bound], attribute, tv[:, bound], self.bind_quantiles, self.bind_tv_split
                )
            bind = torch.stack([jsd[:, bound.index(k)] if k in bound else zero for k in range(len(subjects))], dim=1)
            terms["bind"] = self.bind_weight(inputs.step) * bind
            attendance = tv - terms["bind"]
        terms["loss"] = (-attendance).amax(dim=-1)
        terms["_min_tv"] = tv.amin(dim=-1)
        return terms

    def attribute_maps(self, inputs: Inputs, shape) -> torch.Tensor:
        """The ``attribute_res`` maps resized to ``shape`` by nearest neighbour and averaged: [B, h, w, S]."""
        resized = [
            F.interpolate(inputs.cross[r].permute(0, 3, 1, 2), size=tuple(shape), mode="nearest")
            for r in self.attribute_res
        ]
        return (sum(resized) / len(resized)).permute(0, 2, 3, 1)

    def violates(self, terms: dict, threshold: float) -> torch.Tensor:
        """The least-attended object's TV below the threshold (the official ``threshold_indicator="tv_loss"``)."""
        return terms["_min_tv"] < threshold


def total_variation(maps: torch.Tensor, form: str = "official") -> torch.Tensor:
    """D&B's attendance, [..., h, w] → [...]: mean horizontal |Δ| plus mean vertical |Δ| (``official``: the last row
    against rows 1.., as coded; ``paper``: neighbouring rows)."""
    horizontal = (maps[..., :, :-1] - maps[..., :, 1:]).abs().mean(dim=(-2, -1))
    upper = maps[..., -1:, :] if form == "official" else maps[..., :-1, :]
    return horizontal + (upper - maps[..., 1:, :]).abs().mean(dim=(-2, -1))


def binding_divergence(objects, attributes, tv, quantiles=(0.3, 0.2), split: float = 0.1) -> torch.Tensor:
    """D&B's JSD between each object's and its attribute's spatial distributions, [B, A, h, w] ×2 → [B, A]."""
    top = objects.flatten(2).amax(-1)[..., None, None]  # [B, A, 1, 1]
    p = torch.softmax(objects.flatten(2), dim=-1)
    q = torch.softmax((attributes / attributes.flatten(2).amax(-1)[..., None, None] * top).flatten(2), dim=-1)
    quantile = torch.where(tv < split, quantiles[0], quantiles[1])
    threshold = (quantile * p.amax(-1))[..., None]
    p, q = F.relu(p - threshold) + 1e-5, F.relu(q - threshold) + 1e-5
    log_m = (0.5 * (p + q)).log()
    return 0.5 * ((p * (p.log() - log_m)).sum(-1) + (q * (q.log() - log_m)).sum(-1))
