"""Pure functions of attention maps: Gaussian smoothing, token re-normalisation, the excite,
suppress and layout objectives.

Reference: attend_and_excite.md §1.3 (re-normalisation), §1.4 (smoothing), §1.5 (loss);
STUDIES.md 05 for the suppress (inverse) and layout (KL to a Gaussian at a point) objectives.
Shapes: ``B`` samples, ``T`` subject tokens, ``h×w`` attention grid, ``S`` = 77 text positions.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # any method with A&E's token-map settings (anelab.methods.base.TokenSoftmax)
    from .methods.base import TokenSoftmax as GuidanceConfig


@functools.lru_cache(maxsize=32)
def gaussian_kernel(kernel_size: int = 3, sigma: float = 0.5, convention: str = "legacy") -> torch.Tensor:
    """2-D Gaussian weights [k, k] (fp32, sum 1); ``legacy`` is the official σ_eff = σ·√2 (§1.4).

    Computed in the official order of operations, so the weights match it bit for bit.
    """
    x = torch.arange(kernel_size, dtype=torch.float32) - (kernel_size - 1) / 2
    width = 2 * sigma if convention == "legacy" else sigma * math.sqrt(2)  # legacy: exp(-((x-μ)/(2σ))²)
    g = 1 / (sigma * math.sqrt(2 * math.pi)) * torch.exp(-((x / width) ** 2))
    kernel = g[:, None] * g[None, :]
    return kernel / kernel.sum()


@functools.lru_cache(maxsize=None)  # never evicted: a CUDA graph that smooths reads this tensor's memory
def _kernel_on(
    kernel_size: int, sigma: float, convention: str, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """:func:`gaussian_kernel` as conv2d weights [1, 1, k, k] on ``device``, copied there once (a CUDA graph
    cannot copy from the host)."""
    return gaussian_kernel(kernel_size, sigma, convention).to(device, dtype)[None, None]


def smooth(maps: torch.Tensor, kernel_size: int = 3, sigma: float = 0.5, convention: str = "legacy") -> torch.Tensor:
    """Gaussian-smooth maps [..., h, w] with reflect padding ``kernel_size // 2`` (§1.4)."""
    *lead, h, w = maps.shape
    pad = kernel_size // 2
    if pad >= min(h, w):
        raise ValueError(
            f"kernel_size {kernel_size} is too large for {h}x{w} attention maps (reflect padding needs < {min(h, w)})"
        )
    weight = _kernel_on(kernel_size, sigma, convention, maps.device, maps.dtype)
    x = F.pad(maps.reshape(-1, 1, h, w), (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(x, weight).reshape(*lead, h, w)


def token_columns(mode: str, eot_index: int, n_positions: int = 77) -> slice:
    """Text positions entering the token softmax (§1.3): padded (and legacy, as SD 1.x reads it) 1..n-2, prompt 1..eot-1.
    On models whose tokenizer pads with ``!`` the pipeline resolves legacy to prompt first (:func:`anelab.models.softmax_tokens`)."""
    return slice(1, eot_index) if mode == "prompt" else slice(1, n_positions - 1)


def renormalise(
    maps: torch.Tensor, token_indices: list[int], columns: slice, temperature: float = 100.0
) -> torch.Tensor:
    """Drop ``<sot>``, softmax(×temperature) over ``columns``, pick tokens: [B,h,w,S] → [B,T,h,w] (§1.3)."""
    probs = torch.softmax(maps[..., columns] * temperature, dim=-1)
    return torch.stack([probs[..., i - columns.start] for i in token_indices], dim=1)  # views, no index tensor


def token_maps(maps: torch.Tensor, token_indices: list[int], eot_index: int, config: GuidanceConfig) -> torch.Tensor:
    """Re-normalised, smoothed token maps, [B,h,w,S] → [B,T,h,w]: what the A&E loss takes the max of (§1.3-1.4)."""
    columns = token_columns(config.softmax_tokens, eot_index, maps.shape[-1])
    picked = renormalise(maps, token_indices, columns, config.temperature)
    if config.smooth:
        picked = smooth(picked, config.kernel_size, config.sigma, config.sigma_convention)
    return picked


def max_attention(maps: torch.Tensor, token_indices: list[int], eot_index: int, config: GuidanceConfig) -> torch.Tensor:
    """Smoothed max attention per token, [B,h,w,S] → [B,T]: the quantity A&E excites (§1.3-1.4)."""
    return token_maps(maps, token_indices, eot_index, config).flatten(2).amax(dim=-1)


def excite_loss(max_per_token: torch.Tensor) -> torch.Tensor:
    """A&E loss per sample, ``max_s max(0, 1 − m_s)``: only the most neglected token counts (§1.5). [B,T] → [B]."""
    return (1.0 - max_per_token).clamp(min=0).amax(dim=-1)


def suppress_loss(max_per_token: torch.Tensor, bound: float) -> torch.Tensor:
    """The inverse of the excite loss, ``max_u max(0, m_u − bound)``: only the most present suppressed token counts. [B,U] → [B]."""
    return (max_per_token - bound).clamp(min=0).amax(dim=-1)


def gaussian_target(point: tuple[float, float], shape: tuple[int, int], sigma: float) -> torch.Tensor:
    """``N(G, σ²)`` on an ``h×w`` grid, normalised to sum 1; ``point`` = (x right, y down) in [0, 1], σ in image widths. [h, w]."""
    h, w = shape
    y = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    x = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    density = torch.exp(-((x[None, :] - point[0]) ** 2 + (y[:, None] - point[1]) ** 2) / (2 * sigma**2))
    return density / density.sum()


def layout_kl(maps: torch.Tensor, targets: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``KL(A ‖ D_G)`` of each token map normalised over space against its target density. [B,L,h,w], [L,h,w] → [B,L]."""
    a = maps.flatten(2)
    a = a / a.sum(dim=-1, keepdim=True).clamp(min=eps)
    d = targets.flatten(1).to(a)
    return (a * ((a + eps).log() - (d + eps).log())).sum(dim=-1)


def centroid(maps: torch.Tensor) -> torch.Tensor:
    """Attention centroid (x right, y down, in [0, 1]) of maps normalised over space. [..., h, w] → [..., 2]."""
    h, w = maps.shape[-2:]
    a = maps / maps.sum(dim=(-2, -1), keepdim=True)
    y = (torch.arange(h, dtype=maps.dtype, device=maps.device) + 0.5) / h
    x = (torch.arange(w, dtype=maps.dtype, device=maps.device) + 0.5) / w
    return torch.stack([(a.sum(-2) * x).sum(-1), (a.sum(-1) * y).sum(-1)], dim=-1)


def token_statistics(
    maps: torch.Tensor, token_indices: list[int], eot_index: int, config: GuidanceConfig
) -> dict[str, torch.Tensor]:
    """Per-token scalars of maps [B,h,w,S], each [B,T]: what the attention trends plot.

    ``max_attention``: the smoothed max under the loss's own normalisation (NaN for a token
    outside the softmax columns, e.g. ``<eot>`` with ``softmax_tokens="prompt"``); ``raw_max``: the
    max of the raw probability; ``mass``: its mean over the grid (the token's share of attention);
    ``centroid_x``/``centroid_y``: the centroid of the raw map (x right, y down, in [0, 1]).
    """
    columns = token_columns(config.softmax_tokens, eot_index, maps.shape[-1])
    raw = maps.index_select(-1, torch.tensor(token_indices, device=maps.device)).permute(0, 3, 1, 2)  # [B, T, h, w]
    inside = [columns.start <= i < columns.stop for i in token_indices]
    if all(inside):
        smoothed = max_attention(maps, token_indices, eot_index, config)
    else:
        smoothed = torch.full(raw.shape[:2], float("nan"), dtype=maps.dtype, device=maps.device)
        if any(inside):
            smoothed[:, torch.tensor(inside)] = max_attention(
                maps, [i for i, ok in zip(token_indices, inside) if ok], eot_index, config
            )
    points = centroid(raw)  # [B, T, 2]
    flat = raw.flatten(2)
    return {
        "max_attention": smoothed,
        "raw_max": flat.amax(dim=-1),
        "mass": flat.mean(dim=-1),
        "centroid_x": points[..., 0],
        "centroid_y": points[..., 1],
    }
