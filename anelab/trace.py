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
    "role",  # "excite" (tokens=), "suppress" (suppress=), "layout" (only in layout=) or "modifier" (a subject's attribute)
    "max_attention",  # smoothed max attention (A&E's token maps) at the step's first measurement (before any update)
    "loss",  # the sample's loss at that measurement: A&E's excite loss; another method's loss (= objective)
    "suppress_loss",  # the sample's suppression loss max_u max(0, m_u - suppress_bound) (NaN without suppress=)
    "layout_kl",  # KL(token map ‖ target Gaussian) of a token with a layout target (NaN otherwise)
    "objective",  # what the update descends (A&E: loss + suppress_scale·suppress_loss + layout_scale·Σ layout_kl)
    "step_size",
    "threshold",  # the threshold of a refinement step, else NaN
    "triggered",  # the threshold step needed refinement
    "refinement_iterations",  # refinement updates made at this step
    "reached",  # after refinement the threshold holds (NA off threshold steps)
    "updated",  # the latent was changed at this step
    "final_max_attention",
    "final_loss",
    "final_objective",  # what the regular update descended (after refinement)
    "nonfinite",  # a NaN/inf objective or gradient (fp16 overflow) was met: that sample was not moved by it
]

_PER_SAMPLE = ("triggered", "refinement_iterations", "reached", "updated", "nonfinite")
#: Terms that have a trace column of their own name, or none (the state; a leading underscore: internal).
_CORE_TERMS = {"loss", "max_attention", "suppress", "layout_kl", "state"}


class TraceLog:
    """Collects the rows of each guided step (device tensors) and builds the table at the end."""

    def __init__(self, *, seeds: list[int], measured: list[int], roles: list[str], words: list[str], method=None):
        self.seeds, self.measured, self.roles, self.words = seeds, measured, roles, words
        self.loss_term = getattr(method, "trace_loss", "loss")
        self.steps: list[dict] = []

    def add(
        self,
        *,
        step: int,
        timestep: int,
        step_size: float,
        threshold: float,
        first: dict,
        end: dict,
        **decisions: torch.Tensor,
    ) -> None:
        """One guided step: the method's terms at its first measurement (``first``: before any update) and at the
        end (``end``: what the regular update descended), and the [B] ``decisions`` of ``_PER_SAMPLE`` (``reached`` is
        read only at refinement steps). A term is [B] (per sample) or [B, K] (the first K measured tokens)."""
        columns = {
            "max_attention": first["max_attention"],
            "loss": first[self.loss_term],
            "suppress_loss": first.get("suppress"),
            "layout_kl": first.get("layout_kl"),
            "objective": first["loss"],
            "final_max_attention": end["max_attention"],
            "final_loss": end[self.loss_term],
            "final_objective": end["loss"],
            **decisions,
        }
        columns |= {
            k: v for k, v in first.items() if k not in _CORE_TERMS and k != self.loss_term and not k.startswith("_")
        }
        kept = {k: None if v is None else v.detach().clone() for k, v in columns.items()}
        self.steps.append(dict(step=step, timestep=timestep, step_size=step_size, threshold=threshold, tensors=kept))

    def frame(self) -> pd.DataFrame:
        """Long table, one row per (seed, guided step, token), sorted by seed, step and token position: the core
        columns (``TRACE_COLUMNS``), then the method's own terms."""
        if not self.steps:
            return empty_trace()
        n_seeds, n_tokens, n_steps = len(self.seeds), len(self.measured), len(self.steps)
        shape = (n_steps, n_seeds, n_tokens)
        names = list(dict.fromkeys(k for row in self.steps for k in row["tensors"]))
        values = {}
        for name in names:
            present = [row["tensors"].get(name) for row in self.steps]
            if any(v is None for v in present):  # a column is given at every step or never
                continue
            stacked = torch.stack(present).float().cpu().numpy()  # one copy per column: [steps, B] or [steps, B, K]
            if stacked.ndim == 2:
                stacked = np.repeat(stacked[:, :, None], n_tokens, axis=2)
            elif stacked.shape[2] < n_tokens:  # per subject: the first K measured tokens
                stacked = np.concatenate(
                    [stacked, np.full((n_steps, n_seeds, n_tokens - stacked.shape[2]), np.nan)], axis=2
                )
            values[name] = stacked.reshape(-1)
        thresholds = np.array(
            [r["threshold"] for r in self.steps], dtype=float
        )  # NaN off refinement steps: reached is NA there

        def along(items, axis):  # broadcast a per-step / per-seed / per-token list over the table
            index = [None, None, None]
            index[axis] = slice(None)
            return np.broadcast_to(np.asarray(items)[tuple(index)], shape).reshape(-1)

        nan = np.full(int(np.prod(shape)), np.nan)
        frame = pd.DataFrame(
            {
                "seed": along(self.seeds, 1),
                "step": along([r["step"] for r in self.steps], 0),
                "timestep": along([r["timestep"] for r in self.steps], 0),
                "token": along(np.asarray(self.words, dtype=object), 2),
                "token_index": along(self.measured, 2),
                "role": along(np.asarray(self.roles, dtype=object), 2),
                "max_attention": values["max_attention"],
                "loss": values["loss"],
                "suppress_loss": values.get("suppress_loss", nan),
                "layout_kl": values.get("layout_kl", nan),
                "objective": values["objective"],
                "step_size": along([r["step_size"] for r in self.steps], 0).astype(float),
                "threshold": along(thresholds, 0),
                "triggered": values["triggered"].astype(bool),
                "refinement_iterations": values["refinement_iterations"].astype(np.int64),
                "reached": pd.arrays.BooleanArray(values["reached"] > 0.5, np.isnan(along(thresholds, 0)).copy()),
                "updated": values["updated"].astype(bool),
                "final_max_attention": values["final_max_attention"],
                "final_loss": values["final_loss"],
                "final_objective": values["final_objective"],
                "nonfinite": values["nonfinite"].astype(bool),
            }
            | {name: values[name].astype(float) for name in names if name in values and name not in _COLUMNS_OF_ADD}
        )
        frame = frame.astype({c: float for c in _FLOAT_COLUMNS})
        extra = [c for c in frame.columns if c not in TRACE_COLUMNS]
        return frame.sort_values(["seed", "step", "token_index"], ignore_index=True)[TRACE_COLUMNS + extra]


_COLUMNS_OF_ADD = {
    "max_attention",
    "loss",
    "suppress_loss",
    "layout_kl",
    "objective",
    "final_max_attention",
    "final_loss",
    "final_objective",
    *_PER_SAMPLE,
}
_FLOAT_COLUMNS = [
    "max_attention",
    "loss",
    "objective",
    "final_max_attention",
    "final_loss",
    "final_objective",
    "suppress_loss",
]


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
