"""The guidance trace of one :func:`anelab.generate` call: one row per (seed, guided step, measured token).

Rows are collected as tensors on the sampling device and copied to the CPU once, when the table is
built (no host synchronisation per step). Guidance rate, success rate and mean refinement rounds
(STUDIES.md, measures) are computed from these columns alone (:func:`anelab.analysis.guidance_stats`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

TRACE_COLUMNS = [
    "seed",
    "step",
    "timestep",
    "token",
    "token_index",
    "role",  # "excite" (tokens=), "suppress" (suppress=) or "layout" (only in layout=)
    "max_attention",  # smoothed max attention at the step's first measurement (before any update)
    "loss",  # the sample's A&E (excite) loss at that measurement
    "suppress_loss",  # the sample's suppression loss max_u max(0, m_u - suppress_bound) (NaN without suppress=)
    "layout_kl",  # KL(token map ‖ target Gaussian) of a token with a layout target (NaN otherwise)
    "objective",  # what the update descends: loss + suppress_scale·suppress_loss + layout_scale·Σ layout_kl
    "step_size",
    "threshold",  # α_i; the threshold of a threshold step, else NaN
    "triggered",  # the threshold step needed refinement
    "refinement_iterations",  # refinement updates made at this step
    "reached",  # after refinement the threshold holds (NA off threshold steps)
    "updated",  # the latent was changed at this step
    "final_max_attention",
    "final_loss",
    "final_objective",  # what the regular update descended (after refinement)
    "nonfinite",  # a NaN/inf objective or gradient (fp16 overflow) was met: that sample was not moved by it
]

_PER_SAMPLE = (
    "loss",
    "suppress_loss",
    "objective",
    "triggered",
    "refinement_iterations",
    "reached",
    "updated",
    "final_loss",
    "final_objective",
    "nonfinite",
)
_PER_TOKEN = ("max_attention", "final_max_attention")


class TraceLog:
    """Collects the rows of each guided step (device tensors) and builds the table at the end."""

    def __init__(self, *, seeds: list[int], measured: list[int], roles: list[str], words: list[str], layout: list[int]):
        self.seeds, self.measured, self.roles, self.words = seeds, measured, roles, words
        self.layout_column = [layout.index(i) if i in layout else None for i in measured]  # token → column of the KL
        self.steps: list[dict] = []

    def add(
        self, *, step: int, timestep: int, step_size: float, threshold: float, tensors: dict[str, torch.Tensor | None]
    ) -> None:
        """One guided step: ``tensors`` holds [B] per-sample values (``_PER_SAMPLE``; ``reached`` is read
        only at threshold steps), [B, T] per-token values (``_PER_TOKEN``) and the [B, L] ``layout_kl``
        (``suppress_loss`` and ``layout_kl`` are None in runs without that objective)."""
        kept = {k: None if v is None else v.detach().clone() for k, v in tensors.items()}
        self.steps.append(dict(step=step, timestep=timestep, step_size=step_size, threshold=threshold, tensors=kept))

    def frame(self) -> pd.DataFrame:
        """Long table, one row per (seed, guided step, token), sorted by seed, step and token position."""
        if not self.steps:
            return empty_trace()
        n_seeds, n_tokens, n_steps = len(self.seeds), len(self.measured), len(self.steps)
        columns = {}
        for name in (*_PER_SAMPLE, *_PER_TOKEN, "layout_kl"):
            values = [row["tensors"].get(name) for row in self.steps]
            present = [v for v in values if v is not None]
            stacked = torch.stack(present).float().cpu().numpy() if present else None  # one copy per column
            columns[name] = stacked if len(present) == n_steps else None  # a column is given at every step or never
        for name in _PER_SAMPLE:  # [steps, B] → [steps, B, T]
            if columns[name] is not None:
                columns[name] = np.repeat(columns[name][:, :, None], n_tokens, axis=2)
        kl = columns.pop("layout_kl")
        per_token_kl = np.full((n_steps, n_seeds, n_tokens), np.nan)
        if kl is not None:
            for t, c in enumerate(self.layout_column):
                if c is not None:
                    per_token_kl[:, :, t] = kl[:, :, c]
        shape = (n_steps, n_seeds, n_tokens)
        thresholds = np.array(
            [r["threshold"] for r in self.steps], dtype=float
        )  # NaN off threshold steps: reached is NA there

        def along(values, axis):  # broadcast a per-step / per-seed / per-token list over the table
            index = [None, None, None]
            index[axis] = slice(None)
            return np.broadcast_to(np.asarray(values)[tuple(index)], shape).reshape(-1)

        frame = pd.DataFrame(
            {
                "seed": along(self.seeds, 1),
                "step": along([r["step"] for r in self.steps], 0),
                "timestep": along([r["timestep"] for r in self.steps], 0),
                "token": along(np.asarray(self.words, dtype=object), 2),
                "token_index": along(self.measured, 2),
                "role": along(np.asarray(self.roles, dtype=object), 2),
                "max_attention": columns["max_attention"].reshape(-1),
                "loss": columns["loss"].reshape(-1),
                "suppress_loss": columns["suppress_loss"].reshape(-1)
                if columns["suppress_loss"] is not None
                else np.nan,
                "layout_kl": per_token_kl.reshape(-1),
                "objective": columns["objective"].reshape(-1),
                "step_size": along([r["step_size"] for r in self.steps], 0).astype(float),
                "threshold": along(thresholds, 0),
                "triggered": columns["triggered"].reshape(-1).astype(bool),
                "refinement_iterations": columns["refinement_iterations"].reshape(-1).astype(np.int64),
                "reached": pd.arrays.BooleanArray(
                    columns["reached"].reshape(-1) > 0.5, np.isnan(along(thresholds, 0)).copy()
                ),
                "updated": columns["updated"].reshape(-1).astype(bool),
                "final_max_attention": columns["final_max_attention"].reshape(-1),
                "final_loss": columns["final_loss"].reshape(-1),
                "final_objective": columns["final_objective"].reshape(-1),
                "nonfinite": columns["nonfinite"].reshape(-1).astype(bool),
            }
        )
        frame = frame.astype(
            {
                "max_attention": float,
                "loss": float,
                "objective": float,
                "final_max_attention": float,
                "final_loss": float,
                "final_objective": float,
                "suppress_loss": float,
            }
        )
        return frame.sort_values(["seed", "step", "token_index"], ignore_index=True)[TRACE_COLUMNS]


def empty_trace() -> pd.DataFrame:
    """A trace with no rows and the right column types (plain SD, or no guided step)."""
    dtypes = dict.fromkeys(TRACE_COLUMNS, "float64") | {
        "seed": "int64",
        "step": "int64",
        "timestep": "int64",
        "token": "object",
        "token_index": "int64",
        "role": "object",
        "triggered": "bool",
        "refinement_iterations": "int64",
        "reached": "boolean",
        "updated": "bool",
        "nonfinite": "bool",
    }
    return pd.DataFrame({c: pd.Series(dtype=dtypes[c]) for c in TRACE_COLUMNS})
