"""Fixed attention maps for the methods' fixture tests (tests/fixtures/methods/*.json).

The official implementations were run, outside the project, on exactly these inputs; the fixtures hold
their outputs. The maps are built in float64 with NumPy's PCG64 generator (the same stream on every
machine) and rounded to float32 once, at the end, so every CPU sees the same float32 inputs.

Layout of a case: a prompt of ``eot - 1`` words (``<sot>`` = 0, ``<eot>`` = ``eot``, then padding to 77),
every word with a Gaussian blob of attention at its own place (the same place at every resolution), a
strong ``<sot>`` column as in real Stable Diffusion, and, at 16 × 16, a self-attention map of each cell
that is local around it.
"""

from __future__ import annotations

import numpy as np
import torch

N_TEXT = 77

#: Prompts of the fixture cases: the positions of their words and subjects ``(noun, [modifiers])``.
PROMPTS = {
    # "a red apple and a blue bowl": a=1 red=2 apple=3 and=4 a=5 blue=6 bowl=7, <eot>=8
    "coloured": {"eot": 8, "subjects": [(3, [2]), (7, [6])]},
    # "a cat and a dog": a=1 cat=2 and=3 a=4 dog=5, <eot>=6
    "plain": {"eot": 6, "subjects": [(2, []), (5, [])]},
    # "a green bench and a red car with a dog": bench=3 (green=2), car=7 (red=6), dog=10, <eot>=11
    "three": {"eot": 11, "subjects": [(3, [2]), (7, [6]), (10, [])]},
}


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def fixed_maps(seed: int, eot: int, *, batch: int = 1, resolutions=(16, 32, 64), self_res: int | None = 16):
    """``(cross, self)``: ``cross = {res: [batch, res, res, 77]}`` attention probabilities (each cell sums to 1
    over the 77 text positions), ``self = {self_res: [batch, r, r, r*r]}`` (each cell sums to 1 over the r*r
    keys) or ``{}``; float32 torch tensors."""
    rng = np.random.default_rng(seed)
    cross = {res: np.empty((batch, res, res, N_TEXT)) for res in resolutions}
    self_maps = {} if self_res is None else {self_res: np.empty((batch, self_res, self_res, self_res * self_res))}
    for b in range(batch):
        centres = rng.uniform(0.15, 0.85, size=(eot, 2))  # (x, y) of each word's blob, in image fractions
        widths = rng.uniform(0.08, 0.25, size=eot)
        amplitudes = rng.uniform(0.5, 3.5, size=eot)
        for res in resolutions:
            logits = rng.standard_normal((res, res, N_TEXT)) * 0.3
            y, x = (np.mgrid[0:res, 0:res] + 0.5) / res
            for p in range(1, eot):
                blob = np.exp(-((x - centres[p, 0]) ** 2 + (y - centres[p, 1]) ** 2) / (2 * widths[p] ** 2))
                logits[..., p] += amplitudes[p] * blob
            logits[..., 0] += 4.0  # <sot> takes most of the attention, as in Stable Diffusion
            cross[res][b] = _softmax(logits, -1)
        if self_res is not None:
            r = self_res
            y, x = np.mgrid[0:r, 0:r]
            cells = np.stack([y.ravel(), x.ravel()], axis=1).astype(np.float64)  # [r*r, 2]
            d2 = ((cells[:, None, :] - cells[None, :, :]) ** 2).sum(-1)  # [r*r, r*r]
            width = rng.uniform(1.0, 3.0, size=(r * r, 1))
            logits = -d2 / (2 * width**2) + rng.standard_normal((r * r, r * r)) * 0.5
            self_maps[r][b] = _softmax(logits, -1).reshape(r, r, r * r)
    as_torch = {res: torch.from_numpy(v.astype(np.float32)) for res, v in cross.items()}
    return as_torch, {res: torch.from_numpy(v.astype(np.float32)) for res, v in self_maps.items()}
