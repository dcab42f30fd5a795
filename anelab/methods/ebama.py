"""EBAMA (Zhang, Yu, Wu, Object-Conditioned Energy-Based Attention Map Alignment, ECCV 2024): SynGen's binding with
a cosine distance, plus an object-presence term.

Follows YasminZhang/EBAMA, ``diffusion_pipeline.py`` and ``compute_loss.py`` (commit 1cbf722, MIT), re-implemented
from their formulas, at the defaults of its ``inference.py`` (``dist="cos"``, ``lambda_ours=0.5``):

- maps: the mean cross-attention at ``attention_res`` (16² at 512 px); each word's map as a spatial distribution;
  ``d(p, q) = 1 − p·q / (|p||q|)``;
- every noun is a subject, with its modifiers or alone; for a subject with noun ``n``, modifiers ``M`` and ``O``
  every other word of the prompt, ``positive = Σ_{m∈M} d(A_m, A_n)`` and ``negative = −mean_O d(A_n, A_o)`` once per
  modifier (once for a noun alone): the official ``ours`` form keeps only the noun's side;
- ``presence = −Σ_n max smooth(softmax(100·A[..., 1:-1]))_n`` (A&E's token maps, the legacy 3×3 Gaussian);
- ``loss = Σ_subjects (positive + negative) + λ·presence``, λ = 0.5; ``z ← z − 20·∇L`` once per step for loop
  index i ≤ 25; no refinement.

Published bug: the official ``inference.py`` passes ``syngen_step_size=`` to a pipeline whose argument is
``step_size`` (it stops with a TypeError); the pipeline's defaults are the ones used here.
"""

from __future__ import annotations

import dataclasses

import torch

from ..checks import is_number
from ..errors import AnelabError
from .base import INDEX, TABLE, AtResolution, IndexSteps, Inputs, TokenSoftmax
from .syngen import spatial_distributions


@dataclasses.dataclass(frozen=True)
class Ebama(TokenSoftmax, IndexSteps, AtResolution):
    """EBAMA settings (official defaults, SD 1.4)."""

    name = "ebama"
    label = "EBAMA"
    paper = "Zhang, Yu, Wu, Object-Conditioned Energy-Based Attention Map Alignment in Text-to-Image Diffusion Models, ECCV 2024"
    official = "YasminZhang/EBAMA, diffusion_pipeline.py + compute_loss.py"

    step_schedule: str = dataclasses.field(default="constant", metadata=TABLE)  # a constant step of scale_factor
    max_iter_to_alter: int | None = dataclasses.field(default=26, metadata=INDEX)  # the official `i > 25: no loss`
    presence_weight: float = 0.5  # λ (lambda_ours)

    def _check(self):
        if not is_number(self.presence_weight) or self.presence_weight < 0:
            raise AnelabError(f"presence_weight must be a number >= 0, got {self.presence_weight!r}")

    def terms(self, inputs: Inputs) -> dict:
        """``positive`` and ``negative`` [B, S] per subject, their sum ``attribution`` [B], ``presence`` [B] and
        ``loss`` [B]."""
        subjects = inputs.subjects
        words = spatial_distributions(inputs.cross[self.attention_res], inputs.eot)  # [B, W, hw]
        unit = words / words.norm(dim=-1, keepdim=True)
        distance = 1 - unit @ unit.transpose(1, 2)  # [B, W, W]
        n_words = inputs.eot - 1
        positive, negative = [], []
        for s in subjects:
            row = distance[:, s.noun - 1]
            inside = sum(row[:, k - 1] for k in (s.noun, *s.modifiers))
            away = -(row.sum(dim=-1) - inside) / (n_words - 1 - len(s.modifiers))
            positive.append(sum((distance[:, m - 1, s.noun - 1] for m in s.modifiers), torch.zeros_like(away)))
            negative.append(away * max(1, len(s.modifiers)))
        maxima = (
            self.token_maps(inputs.cross[self.attention_res], [s.noun for s in subjects], inputs).flatten(2).amax(-1)
        )
        positive, negative = torch.stack(positive, dim=1), torch.stack(negative, dim=1)
        presence = -maxima.sum(dim=-1)
        attribution = (positive + negative).sum(dim=-1)
        return {
            "positive": positive,
            "negative": negative,
            "attribution": attribution,
            "presence": presence,
            "loss": attribution + self.presence_weight * presence,
        }
