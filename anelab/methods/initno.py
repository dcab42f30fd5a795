"""InitNO (Guo et al., Initial Noise Optimization, CVPR 2024): optimise the initial noise until the subjects'
attention responds and their self-attention does not overlap, then A&E-style latent updates.

Follows xiefan-guo/initno, ``initno/pipelines/pipeline_sd_initno.py`` and ``utils/attn_utils.py`` (commit
fa021c4, Apache-2.0), re-implemented from their formulas:

- maps: ``P = softmax(100·A16[..., 1:-1])`` (columns 1..75), each noun's map smoothed (A&E's legacy 3×3);
  its top cell ``c_s`` and value ``v_s``;
- ``cross = max_s relu(1 − v_s)``; ``self`` = the mean over noun pairs of ``Σ min(S_i, S_j) / (Σ(S_i + S_j) + 1e-6)``,
  ``S_s`` the smoothed self-attention row at ``c_s`` (16² → 16×16); ``clean`` = Σ_s the largest background value
  where it exceeds the smallest foreground value, the foreground being the 4-connected component holding ``c_s``
  of the Otsu mask of ``floor(255·P̃_s)`` (OpenCV's Otsu: 256 bins, the first maximum of the between-class variance);
  ``align`` = Σ_s mean|P̃_s − smooth(EMA_s)|, the EMA (0.9) of the unsmoothed maps updated at every measurement
  before it is compared;
- **initial noise**: ``z' = z·exp(½·logvar) + μ``, Adam (lr 1e-2, eps 1e-3) on ``cross + self + clean`` (``self``
  is 0 while ``cross > 0.5``) at the first timestep, each Adam step followed by Adam steps on
  ``KL = −½·mean(1 + logvar − μ² − exp(logvar))`` until KL ≤ 1e-3; a round of 10 steps succeeds when ``cross < 0.2``
  and ``self < 0.3`` (tested before each update); a failed round draws new noise from the seed's generator; at
  most 5 rounds; the rounds are ranked by ``cross + self`` (+1 when ``self`` ≤ 1e-6) and if the best is no success,
  50 more steps from its original noise (used whatever they reach);
- **latents**: ``z ← z − α_i ∇cross`` for i < 25 (α_i = 20·√r_i); at loop index 10 and 20, refinement while
  ``cross > 1 − 0.8`` or the ungated ``self > 0.3`` (at most 20 updates) on
  ``cross + 0.1·clean + 0.1·align + self``.

The official inner KL loop has no bound (xiefan-guo/initno issue #2, "endless loop"): here it stops after
``kl_max_steps`` and says so in the noise report.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..checks import is_int, is_number
from ..errors import AnelabError
from ..objectives import renormalise, smooth, token_columns
from ..subjects import SubjectPositions
from .base import KEYS, AtResolution, IndexSteps, Inputs, Reads, Thresholds, TokenSoftmax

FLT_EPSILON = float(np.finfo(np.float32).eps)  # OpenCV's bound on the class weights in Otsu's loop


@dataclasses.dataclass(frozen=True)
class InitNO(TokenSoftmax, Thresholds, IndexSteps, AtResolution):
    """InitNO settings (official defaults, SD 1.4)."""

    name = "initno"
    label = "InitNO"
    paper = "Guo et al., InitNO: Boosting Text-to-Image Diffusion Models via Initial Noise Optimization, CVPR 2024"
    official = "xiefan-guo/initno, initno/pipelines/pipeline_sd_initno.py + utils/attn_utils.py"
    refine_term = "refinement"
    trace_loss = "cross"
    state_per_measurement = True

    thresholds: Mapping[int, float] = dataclasses.field(default_factory=lambda: {10: 0.8, 20: 0.8}, metadata=KEYS)
    self_threshold: float = 0.3  # refinement also while the (ungated) self loss is above this
    refine_clean: float = 0.1  # weights of the refinement objective's clean and align terms
    refine_align: float = 0.1
    ema: float = 0.9  # the alignment state's decay
    self_gate: float = 0.5  # the noise objective's self term is 0 while cross exceeds this
    noise_rounds: int = 5
    noise_steps: int = 10  # Adam steps per round
    noise_fallback_steps: int = 50
    noise_lr: float = 1e-2
    noise_eps: float = 1e-3
    noise_cross: float = 0.2  # a round succeeds when cross < this and self < noise_self
    noise_self: float = 0.3
    kl_threshold: float = 1e-3
    kl_max_steps: int = 1000  # the official inner loop has no bound

    def _check(self):
        for name in ("self_threshold", "refine_clean", "refine_align", "self_gate", "noise_cross", "noise_self"):
            if not is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise AnelabError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        if not is_number(self.ema) or not 0 <= self.ema < 1:
            raise AnelabError(f"ema must lie in [0, 1), got {self.ema!r}")
        for name in ("noise_rounds", "noise_steps", "noise_fallback_steps", "kl_max_steps"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise AnelabError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        for name in ("noise_lr", "noise_eps", "kl_threshold"):
            if not is_number(getattr(self, name)) or getattr(self, name) <= 0:
                raise AnelabError(f"{name} must be a number > 0, got {getattr(self, name)!r}")

    def reads(self) -> Reads:
        return Reads(cross=(self.attention_res,), self_attention=(self.attention_res,))

    def measured(self, subjects: SubjectPositions) -> tuple[list[int], list[str]]:
        return [s.noun for s in subjects], [s.role for s in subjects]  # modifiers are not read

    def terms(self, inputs: Inputs) -> dict:
        """``cross`` [B] (the loss), ``self`` [B] (gated: the noise objective's), ``self_raw`` [B], ``clean`` [B],
        ``align`` [B, S], ``noise_objective`` and ``refinement`` [B], ``max_attention`` [B, S], ``state``."""
        nouns = [s.noun for s in inputs.subjects]
        method = self.normalised(inputs.columns)
        columns = token_columns(method.softmax_tokens, inputs.eot, inputs.cross[self.attention_res].shape[-1])
        raw = renormalise(inputs.cross[self.attention_res], nouns, columns, self.temperature)  # P [B, S, h, w]
        maps = smooth(raw, self.kernel_size, self.sigma, self.sigma_convention) if self.smooth else raw
        flat = maps.flatten(2)
        top = flat.detach().argmax(dim=-1)  # c_s [B, S]
        value = flat.gather(-1, top[..., None])[..., 0]  # v_s [B, S], with its gradient
        cross = (1.0 - value).clamp(min=0).amax(dim=-1)
        rows = self_rows(inputs.self_attention[self.attention_res], top)  # [B, S, h, w]
        if self.smooth:
            rows = smooth(rows, self.kernel_size, self.sigma, self.sigma_convention)
        overlap = self_overlap(rows)
        clean = clean_loss(maps, top).sum(dim=-1)
        previous = None if inputs.previous is None else inputs.previous["ema"]
        ema = raw.detach() if previous is None else previous * self.ema + raw.detach() * (1 - self.ema)
        target = smooth(ema, self.kernel_size, self.sigma, self.sigma_convention) if self.smooth else ema
        align = (maps - target).abs().flatten(2).mean(dim=-1)  # [B, S]
        gated = torch.where(cross > self.self_gate, overlap * 0, overlap)
        return {
            "max_attention": value,
            "cross": cross,
            "self": gated,
            "self_raw": overlap,
            "clean": clean,
            "align": align,
            "noise_objective": cross + gated + clean,
            "refinement": cross + self.refine_clean * clean + self.refine_align * align.sum(dim=-1) + overlap,
            "loss": cross,
            "state": {"ema": ema},
        }

    def violates(self, terms: dict, threshold: float) -> torch.Tensor:
        return (terms["cross"] > max(0.0, 1.0 - threshold)) | (terms["self_raw"] > self.self_threshold)

    # -- the initial noise ----------------------------------------------------------------------------
    def optimise_noise(self, context) -> tuple[torch.Tensor, pd.DataFrame]:
        """The initial-noise optimisation (module docstring), every seed on its own (its own Adam state, rounds and
        fresh noise from its own generator), the seeds of the batch measured together."""
        z = context.z.detach().clone()
        n = len(z)
        pool: list[list[tuple]] = [[] for _ in range(n)]  # per seed: (score, round, optimised, original, success)
        done = [False] * n
        report = [dict(rounds=0, steps=0, kl_steps=0, kl_capped=False, fallback=False) for _ in range(n)]
        for round_ in range(self.noise_rounds):
            rows = [b for b in range(n) if not done[b]]
            if not rows:
                break
            results = self._noise_round(context, z[rows], self.noise_steps, [report[b] for b in rows])
            for b, (noise, success, score) in zip(rows, results):
                report[b]["rounds"] += 1
                pool[b].append((score, round_, noise, z[b : b + 1].clone(), success))
                done[b] = success
            fresh = [b for b in rows if not done[b]]
            if fresh and round_ + 1 < self.noise_rounds:
                z[fresh] = context.fresh_noise(fresh).to(z)
        out, success, fallback = [], [], []
        for b in range(n):
            best = min(pool[b], key=lambda item: (item[0], item[1])) if pool[b] else None
            if best is None:  # no rounds at all (noise_rounds=0): the seed's own noise
                out.append(z[b : b + 1])
                success.append(False)
                fallback.append(False)
            elif best[4]:
                out.append(best[2])
                success.append(True)
                fallback.append(False)
            else:
                out.append(None)
                success.append(False)
                fallback.append(True)
        again = [b for b in range(n) if fallback[b]]
        if again and self.noise_fallback_steps:
            originals = torch.cat([min(pool[b], key=lambda item: (item[0], item[1]))[3] for b in again])
            results = self._noise_round(context, originals, self.noise_fallback_steps, [report[b] for b in again])
            for b, (noise, ok, _) in zip(again, results):
                out[b], success[b] = noise, ok
        elif again:
            for b in again:
                out[b] = min(pool[b], key=lambda item: (item[0], item[1]))[3]
        capped = [b for b in range(n) if report[b]["kl_capped"]]
        if capped:
            warnings.warn(
                f"InitNO: the KL loop reached kl_max_steps={self.kl_max_steps} for seed(s) "
                f"{[context.plan.seeds[b] for b in capped]} (the official loop has no bound)",
                stacklevel=3,
            )
        final = torch.cat(out)
        with torch.no_grad():
            terms = context.measure(final).terms
        frame = pd.DataFrame(
            {
                "seed": context.plan.seeds,
                "success": success,
                "fallback": fallback,
                "rounds": [r["rounds"] for r in report],
                "steps": [r["steps"] for r in report],
                "kl_steps": [r["kl_steps"] for r in report],
                "kl_capped": [r["kl_capped"] for r in report],
                "cross": terms["cross"].detach().float().cpu().numpy(),
                "self": terms["self"].detach().float().cpu().numpy(),
                "clean": terms["clean"].detach().float().cpu().numpy(),
            }
        )
        return final.detach(), frame

    def _noise_round(self, context, z: torch.Tensor, steps: int, reports: list[dict]):
        """One round for the samples of ``z``: up to ``steps`` Adam steps each (a sample stops once it succeeds).
        Returns per sample ``(optimised noise [1, ...], success, score)``."""
        n = len(z)
        mus = [torch.zeros_like(z[b : b + 1], requires_grad=True) for b in range(n)]
        logvars = [torch.zeros_like(z[b : b + 1], requires_grad=True) for b in range(n)]
        optimiser = torch.optim.Adam([*logvars, *mus], lr=self.noise_lr, eps=self.noise_eps)
        success, score = [False] * n, [float("inf")] * n
        for _ in range(steps):
            active = [b for b in range(n) if not success[b]]
            if not active:
                break
            with torch.enable_grad():
                noise = torch.cat([z[b : b + 1] * torch.exp(0.5 * logvars[b]) + mus[b] for b in active])
                terms = context.measure(noise).terms
                cross, gated = terms["cross"].detach().cpu(), terms["self"].detach().cpu()
                moving = []
                for k, b in enumerate(active):
                    s = float(gated[k])
                    score[b] = float(cross[k]) + s + (1.0 if s <= 1e-6 else 0.0)
                    if float(cross[k]) < self.noise_cross and s < self.noise_self:
                        success[b] = True
                    else:
                        moving.append(k)
                if not moving:
                    break
                optimiser.zero_grad()
                objective = terms["noise_objective"]
                objective[moving].sum().backward()
            self._step(optimiser, [active[k] for k in moving], mus, logvars)
            for k in moving:
                reports[active[k]]["steps"] += 1
            self._kl_steps(optimiser, [active[k] for k in moving], mus, logvars, reports)
        noise = [(z[b : b + 1] * torch.exp(0.5 * logvars[b]) + mus[b]).detach() for b in range(n)]
        return list(zip(noise, success, score))

    def _kl_steps(self, optimiser, rows: list[int], mus, logvars, reports) -> None:
        """Adam steps on each sample's KL until it is at most ``kl_threshold`` (at most ``kl_max_steps``)."""
        for step in range(self.kl_max_steps + 1):
            with torch.enable_grad():
                kl = {b: noise_kl(mus[b], logvars[b]) for b in rows}
            rows = [b for b in rows if float(kl[b].detach()) > self.kl_threshold]
            if not rows:
                return
            if step == self.kl_max_steps:
                for b in rows:
                    reports[b]["kl_capped"] = True
                return
            optimiser.zero_grad()
            with torch.enable_grad():
                sum(kl[b] for b in rows).backward()
            self._step(optimiser, rows, mus, logvars)
            for b in rows:
                reports[b]["kl_steps"] += 1

    @staticmethod
    def _step(optimiser, rows: list[int], mus, logvars) -> None:
        """One Adam step of the samples ``rows`` only (the others keep their parameters and Adam state)."""
        keep = set(rows)
        for b in range(len(mus)):
            if b not in keep:
                mus[b].grad = logvars[b].grad = None
        optimiser.step()


def noise_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """InitNO's KL of ``N(μ, exp(logvar))`` to ``N(0, 1)``: ``−½·mean(1 + logvar − μ² − exp(logvar))`` (a scalar)."""
    return torch.mean(-0.5 * torch.mean(1 + logvar - mu**2 - logvar.exp()), dim=0)


def self_rows(self_attention: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """The self-attention row of each subject's top cell as a map: [B, h, w, h·w], [B, S] → [B, S, h, w]."""
    b, h, w, _ = self_attention.shape
    flat = self_attention.reshape(b, h * w, h * w)
    rows = flat.gather(1, top[..., None].expand(-1, -1, h * w))  # [B, S, hw]
    return rows.unflatten(-1, (h, w))


def self_overlap(rows: torch.Tensor) -> torch.Tensor:
    """Mean over subject pairs of ``Σ min(S_i, S_j) / (Σ(S_i + S_j) + 1e-6)``: [B, S, h, w] → [B] (0 without a pair)."""
    pairs = [(i, j) for i in range(rows.shape[1]) for j in range(i + 1, rows.shape[1])]
    if not pairs:
        return rows.new_zeros(rows.shape[0])
    values = [
        torch.minimum(rows[:, i], rows[:, j]).flatten(1).sum(-1) / ((rows[:, i] + rows[:, j]).flatten(1).sum(-1) + 1e-6)
        for i, j in pairs
    ]
    return sum(values) / len(values)


def otsu_threshold(maps: torch.Tensor) -> torch.Tensor:
    """OpenCV's Otsu threshold of ``floor(255·x)`` (as the official ``cv2.threshold`` on ``uint16(x·255)``), in units
    of x: [..., h, w] → [...]. 256 bins; the first maximum of the between-class variance (float64)."""
    levels = torch.floor(maps.detach().double() * 255).clamp(0, 255).flatten(-2)  # [..., n]
    bins = torch.arange(256, dtype=torch.float64, device=maps.device)
    hist = (levels[..., None] == bins).double().mean(dim=-2)  # [..., 256], sums to 1
    q1 = hist.cumsum(-1)
    mass = (hist * bins).cumsum(-1)
    total = mass[..., -1:]
    q2 = 1.0 - q1
    mu1 = mass / q1.clamp(min=1e-300)
    mu2 = (total - mass) / q2.clamp(min=1e-300)
    variance = q1 * q2 * (mu1 - mu2) ** 2
    valid = (torch.minimum(q1, q2) >= FLT_EPSILON) & (torch.maximum(q1, q2) <= 1.0 - FLT_EPSILON)
    variance = torch.where(valid, variance, torch.full_like(variance, -1.0))
    best = variance.argmax(dim=-1)  # the first maximum
    none = variance.amax(dim=-1) <= 0  # no valid split beats 0: OpenCV keeps threshold 0
    return torch.where(none, torch.zeros_like(best), best).to(maps.dtype) / 255.0


def component(mask: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """The 4-connected component of ``mask`` holding the cell ``seed``: [B, S, h, w] bool, [B, S] flat index → bool mask
    (flood fill by repeated dilation inside the mask, h·w times: fixed work, no host synchronisation)."""
    h, w = mask.shape[-2:]
    grown = F.one_hot(seed, h * w).bool().view(*seed.shape, h, w) & mask
    for _ in range(h * w):
        padded = F.pad(grown.float(), (1, 1, 1, 1))
        neighbours = padded[..., 1:-1, :-2] + padded[..., 1:-1, 2:] + padded[..., :-2, 1:-1] + padded[..., 2:, 1:-1]
        grown = grown | ((neighbours > 0) & mask)
    return grown


def clean_loss(maps: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """InitNO's clean term per subject: the background's max where it exceeds the foreground's min, the foreground
    being the Otsu mask's component holding the top cell. [B, S, h, w], [B, S] → [B, S]."""
    threshold = otsu_threshold(maps)[..., None, None]
    foreground = component(maps >= threshold, top).to(maps.dtype)
    fg = maps * foreground + (1 - foreground)
    bg = maps * (1 - foreground)
    high, low = bg.flatten(2).amax(-1), fg.flatten(2).amin(-1)
    return torch.where(high > low, high, high * 0)
