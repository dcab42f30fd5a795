"""CONFORM (Meral et al., Contrast is All You Need, CVPR 2024): a contrastive (NT-Xent) objective on the attention
maps — a subject's attribute and noun maps attract, other subjects' repel — with the previous step's maps as
extra positives.

Follows gemlab-vt/CONFORM, ``pipeline_conform.py`` (commit 4ad0e37, MIT), re-implemented from its formulas:

- embeddings: each subject token's map at ``attention_res`` (``A[..., 1:-1]``, the token's column; with
  ``softmax_normalize`` first ×100 and a softmax over those columns), smoothed (A&E's legacy 3×3 Gaussian) and
  flattened; the previous step's embeddings of the same tokens join with the same labels; label = subject;
- loss: pytorch-metric-learning's ``NTXentLoss(temperature=0.5)`` with cosine similarity: the mean over every
  ordered positive pair (a, p) of ``−log(e^{s_ap/τ} / (e^{s_ap/τ} + Σ_{n ∉ class(a)} e^{s_an/τ}))``, 0 without a
  positive or a negative pair;
- update ``α_i = 20·√r_i`` for i < ``max_iter_to_alter``; at loop index 0, 10 and 20 exactly 20 refinement updates
  (no threshold test), then a re-measure and the regular update.

Defaults are the published notebook's (``softmax_normalize=False``, ``max_iter_to_alter=30``, fp16 SD 1.5): the
pipeline call's own defaults (``softmax_normalize=True``, 25) are one ``replace`` away, except that the official
pipeline multiplies the *stored* previous maps by 100 in place at every loss call, so at a refinement step they
grow ×100 per iteration (overflowing in fp16 from the second iteration); anelab normalises them once.
"""

from __future__ import annotations

import dataclasses

import torch

from ..checks import is_int, is_number
from ..errors import AnelabError
from ..objectives import renormalise, smooth, token_columns
from .base import INDEX, INDICES, AtResolution, IndexSteps, Inputs, TokenSoftmax


@dataclasses.dataclass(frozen=True)
class Conform(TokenSoftmax, IndexSteps, AtResolution):
    """CONFORM settings (the published notebook's, SD 1.5)."""

    name = "conform"
    label = "CONFORM"
    paper = (
        "Meral et al., CONFORM: Contrast is All You Need For High-Fidelity Text-to-Image Diffusion Models, CVPR 2024"
    )
    official = "gemlab-vt/CONFORM, pipeline_conform.py (settings of notebook.ipynb)"

    max_iter_to_alter: int | None = dataclasses.field(default=30, metadata=INDEX)  # the notebook's (the call: 25)
    refinement_steps: tuple[int, ...] = dataclasses.field(default=(0, 10, 20), metadata=INDICES)
    max_refinement_steps: int = 20  # exactly this many refinement updates at each of refinement_steps
    softmax_normalize: bool = False  # ×100 softmax over the text columns first (the call's default: True)
    contrast_temperature: float = 0.5  # τ of NT-Xent
    use_previous: bool = True  # the previous step's maps join as positives (add_previous_attention_maps)

    def _check(self):
        steps = self.refinement_steps
        if not isinstance(steps, (tuple, list)) or not all(is_int(i) and i >= 0 for i in steps):
            raise AnelabError(f"refinement_steps must be loop indices (ints >= 0), got {steps!r}")
        object.__setattr__(self, "refinement_steps", tuple(sorted({int(i) for i in steps})))
        if not is_int(self.max_refinement_steps) or self.max_refinement_steps < 0:
            raise AnelabError(f"max_refinement_steps must be an int >= 0, got {self.max_refinement_steps!r}")
        for name in ("softmax_normalize", "use_previous"):
            if not isinstance(getattr(self, name), bool):
                raise AnelabError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not is_number(self.contrast_temperature) or self.contrast_temperature <= 0:
            raise AnelabError(f"contrast_temperature must be a number > 0, got {self.contrast_temperature!r}")

    def refinement(self, i: int):
        return (float("nan"), self.max_refinement_steps) if i in self.refinement_steps else None

    def violates(self, terms: dict, threshold: float) -> torch.Tensor:
        return torch.ones_like(terms["loss"], dtype=torch.bool)  # no threshold: every sample refines to the cap

    def check_schedule(self, n_iterations: int) -> None:
        late = [i for i in self.refinement_steps if i >= n_iterations]
        if late:
            raise AnelabError(
                f"refinement_steps {late} are beyond the schedule: it has {n_iterations} loop iterations; "
                "config.rescaled(50, n) moves a 50-step schedule to n steps"
            )

    def embeddings(self, inputs: Inputs) -> torch.Tensor:
        """Each subject token's processed map, flattened: [B, T, h·w] in the order of :meth:`tokens`."""
        maps = inputs.cross[self.attention_res]
        positions = self.tokens(inputs.subjects)
        if self.softmax_normalize:
            method = self.normalised(inputs.columns)
            columns = token_columns(method.softmax_tokens, inputs.eot, maps.shape[-1])
            picked = renormalise(maps, positions, columns, self.temperature)
        else:
            picked = torch.stack([maps[..., p] for p in positions], dim=1)  # [B, T, h, w]
        if self.smooth:
            picked = smooth(picked, self.kernel_size, self.sigma, self.sigma_convention)
        return picked.flatten(2)

    @staticmethod
    def tokens(subjects) -> list[int]:
        """Every subject's tokens, its modifiers then its noun (the official token groups), in subject order."""
        return [p for s in subjects for p in (*s.modifiers, s.noun)]

    def terms(self, inputs: Inputs) -> dict:
        """``loss`` [B] (NT-Xent) and ``state`` (this measurement's embeddings, the next step's positives)."""
        current = self.embeddings(inputs)
        labels = [k for k, s in enumerate(inputs.subjects) for _ in (*s.modifiers, s.noun)]
        embeddings, classes = current, labels
        previous = None if inputs.previous is None or not self.use_previous else inputs.previous["embeddings"]
        if previous is not None:  # interleaved as the official code adds them: token, its previous map, ...
            embeddings = torch.stack([current, previous.to(current)], dim=2).flatten(1, 2)
            classes = [c for c in labels for _ in (0, 1)]
        return {
            "loss": nt_xent(embeddings, classes, self.contrast_temperature),
            "state": {"embeddings": current.detach()},
        }


def nt_xent(embeddings: torch.Tensor, labels: list[int], temperature: float) -> torch.Tensor:
    """pytorch-metric-learning's ``NTXentLoss`` with cosine similarity, per sample: [B, N, d], N labels → [B]. Only
    basic indexing over the (static) pairs, so a CUDA graph can capture it."""
    unit = embeddings / embeddings.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    similarity = unit @ unit.transpose(1, 2) / temperature  # [B, N, N]
    losses = []
    for a, label in enumerate(labels):
        negatives = [n for n, other in enumerate(labels) if other != label]
        if not negatives:
            continue
        for p, other in enumerate(labels):
            if p == a or other != label:
                continue
            logits = torch.stack([similarity[:, a, p], *(similarity[:, a, n] for n in negatives)], dim=-1)
            losses.append(torch.logsumexp(logits, dim=-1) - similarity[:, a, p])
    if not losses:
        return embeddings.sum(dim=(1, 2)) * 0  # no positive or no negative pair: 0, still a function of the maps
    return torch.stack(losses, dim=-1).mean(dim=-1)
