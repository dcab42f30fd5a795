"""SynGen (Rassin et al., Linguistic Binding in Diffusion Models, NeurIPS 2023): pull each modifier's attention
towards its noun's and push both away from every other word of the prompt.

Follows RoyiRa/Linguistic-Binding-in-Diffusion-Models, ``syngen_diffusion_pipeline.py`` and ``compute_loss.py``
(commit 50b8eab), re-implemented from their formulas (the repository has no licence):

- maps: the mean cross-attention at ``attention_res`` (16² at 512 px), **no** token softmax and no smoothing;
  each word's map is a spatial distribution (normalised over the grid; logs of values clamped to
  [ε, 1 − ε], ε = float32's machine epsilon, as ``torch.distributions.Categorical`` does);
- ``symKL(p, q) = (KL(p‖q) + KL(q‖p)) / 2``; for a subject with noun ``n`` and modifiers ``M`` and ``O`` every
  other word of the prompt (positions 1..eot−1 outside the subject: function words and the other subjects
  included), the subject's loss is ``Σ_{m∈M} [symKL(A_m, A_n) + (−mean_O symKL(A_m, A_o) − mean_O symKL(A_n, A_o))/2]``;
  the loss is the sum over subjects;
- a noun without modifiers has no term (the official default ``include_entities=False``; it still counts among
  the other subjects' ``O``); with ``include_entities=True`` it adds ``−mean_O symKL(A_n, A_o)``;
- update ``z ← z − 20·∇L`` once per step for loop index i < 25; no refinement, no step decay.

The official code takes the subjects from a spaCy parse (``anelab.subjects.parse_subjects`` does the same; the
A&E benchmark's colour–object pairs follow from the prompt data).
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import AnelabError
from ..subjects import SubjectPositions
from .base import INDEX, TABLE, AtResolution, IndexSteps, Inputs


@dataclasses.dataclass(frozen=True)
class SynGen(IndexSteps, AtResolution):
    """SynGen settings (official defaults, SD 1.4)."""

    name = "syngen"
    label = "SynGen"
    paper = "Rassin et al., Linguistic Binding in Diffusion Models, NeurIPS 2023"
    official = "RoyiRa/Linguistic-Binding-in-Diffusion-Models, syngen_diffusion_pipeline.py + compute_loss.py"
    binding = True

    step_schedule: str = dataclasses.field(default="constant", metadata=TABLE)  # a constant step of scale_factor
    max_iter_to_alter: int | None = dataclasses.field(default=25, metadata=INDEX)  # num_intervention_steps
    include_entities: bool = False  # nouns without modifiers get the negative term too

    def _check(self):
        if not isinstance(self.include_entities, bool):
            raise AnelabError(f"include_entities must be true or false, got {self.include_entities!r}")

    def needs_modifiers(self) -> bool:
        return not self.include_entities

    def terms(self, inputs: Inputs) -> dict:
        """``positive`` and ``negative`` [B, S] per subject, ``loss`` [B] (their sum over subjects)."""
        words = spatial_distributions(inputs.cross[self.attention_res], inputs.eot)  # [B, W, hw], word p = column p-1
        distance = pairwise_sym_kl(words)  # [B, W, W]
        positive, negative = binding_terms(distance, inputs.subjects, inputs.eot, self.include_entities)
        return {"positive": positive, "negative": negative, "loss": (positive + negative).sum(dim=-1)}


def spatial_distributions(maps: torch.Tensor, eot: int) -> torch.Tensor:
    """Each prompt word's map (positions 1..eot−1) as a distribution over the grid: [B, h, w, S] → [B, eot−1, h·w]."""
    words = maps[..., 1:eot].flatten(1, 2).transpose(1, 2)  # [B, W, hw]
    return words / words.sum(dim=-1, keepdim=True)


def pairwise_sym_kl(p: torch.Tensor) -> torch.Tensor:
    """``(KL(p_i‖p_j) + KL(p_j‖p_i)) / 2`` for every pair of distributions, [B, W, n] → [B, W, W] (logs of values
    clamped to [ε, 1 − ε], as ``torch.distributions.Categorical``)."""
    eps = torch.finfo(p.dtype).eps
    log_p = p.clamp(eps, 1 - eps).log()
    entropy = (p * log_p).sum(dim=-1)  # Σ p_i log p_i, [B, W]
    cross = p @ log_p.transpose(1, 2)  # Σ p_i log p_j, [B, W, W]
    kl = entropy[:, :, None] - cross
    return (kl + kl.transpose(1, 2)) / 2


def binding_terms(distance: torch.Tensor, subjects: SubjectPositions, eot: int, include_entities: bool):
    """SynGen's positive and negative terms per subject from a word-by-word distance [B, W, W] (word p = row p−1):
    ``positive`` = Σ_m d(m, n); ``negative`` = Σ_m (−mean_O d(m, o) − mean_O d(n, o)) / 2 (``include_entities``: a
    noun alone, −mean_O d(n, o)). [B, S] each; only basic indexing (a CUDA graph can capture it)."""
    n_words = eot - 1

    def outside_mean(word: int, subject) -> torch.Tensor:  # mean over O of d(word, o): all words minus the subject's
        row = distance[:, word - 1]
        inside = sum(row[:, k - 1] for k in (subject.noun, *subject.modifiers))
        return (row.sum(dim=-1) - inside) / (n_words - 1 - len(subject.modifiers))

    zero = distance.new_zeros(distance.shape[0])
    positive, negative = [], []
    for subject in subjects:
        noun = outside_mean(subject.noun, subject)
        if subject.modifiers:
            positive.append(sum(distance[:, m - 1, subject.noun - 1] for m in subject.modifiers))
            negative.append(sum((-outside_mean(m, subject) - noun) / 2 for m in subject.modifiers))
        else:
            positive.append(zero)
            negative.append(-noun if include_entities else zero)
    return torch.stack(positive, dim=1), torch.stack(negative, dim=1)
