"""Figures of recorded attention. Each function takes ``ax=None`` and returns the Figure.

Figures are built as ``matplotlib.figure.Figure`` objects (no pyplot state, no rcParams), so a
notebook shows each exactly once: where it is returned or ``display``-ed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from .analysis import DEFAULT_QUANTILES, quantile_trends
from .cache import AttentionCache
from .errors import AnelabError

CMAP = "magma"


def _axes_grid(ax, rows: int, cols: int, panel: float = 2.2) -> tuple[Figure, np.ndarray]:
    """``ax`` as a ``[rows, cols]`` array of Axes, or a new figure with that grid."""
    if ax is None:
        fig = Figure(figsize=(panel * cols + 1.2, panel * rows + 0.8), layout="constrained")
        return fig, np.asarray(fig.subplots(rows, cols, squeeze=False))
    axes = np.asarray(ax, dtype=object).reshape(-1)
    if axes.size != rows * cols:
        raise AnelabError(f"this figure needs {rows}x{cols} axes, got {axes.size}")
    return axes[0].figure, axes.reshape(rows, cols)


def _image_of(images, cache: AttentionCache, seed: int | None):
    """``images`` is one image, or one per recorded seed (list in ``cache.seeds`` order, or dict by seed)."""
    if images is None:
        return None
    if isinstance(images, Mapping):
        return images[cache.seeds[cache.seed_row(seed)]]
    if isinstance(images, (list, tuple)):
        if len(images) != len(cache.seeds):
            raise AnelabError(f"got {len(images)} images for {len(cache.seeds)} recorded seeds; pass one image or one per seed")
        return images[cache.seed_row(seed)]
    return images


def _draw(ax, heat: torch.Tensor, image, vmax: float, alpha: float):
    """One heat map on ``ax``, optionally upsampled over ``image``; returns the mappable."""
    ax.set_xticks([])
    ax.set_yticks([])
    if image is None:
        return ax.imshow(heat.numpy(), cmap=CMAP, vmin=0, vmax=vmax, interpolation="nearest")
    picture = np.asarray(image)
    ax.imshow(picture)
    up = F.interpolate(heat[None, None], size=picture.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    return ax.imshow(up.numpy(), cmap=CMAP, vmin=0, vmax=vmax, alpha=alpha)


def _step_label(cache: AttentionCache, step: int) -> str:
    return f"step {step} (t={cache.timesteps[step]})"


def attention_map(
    cache: AttentionCache, *, token: str | int, step: int, res: int | None = None, layer: str | None = None,
    seed: int | None = None, image=None, alpha: float = 0.6, vmax: float | None = None, ax=None,
) -> Figure:  # fmt: skip
    """One token's recorded map (a layer's, or the mean at ``res``), optionally over the image."""
    heat = cache.maps(token=token, step=step, res=res, layer=layer, seed=seed)
    fig, axes = _axes_grid(ax, 1, 1, panel=3.6)
    mappable = _draw(axes[0, 0], heat, _image_of(image, cache, seed), vmax or float(heat.max()), alpha)
    where = f"res {res} mean" if layer in (None, "mean") else layer
    word = cache.tokens[cache.token_index(token)]
    axes[0, 0].set_title(f"'{word}' · {where}\n{_step_label(cache, step)} · seed {cache.seeds[cache.seed_row(seed)]}", fontsize=9)
    fig.colorbar(mappable, ax=axes[0, 0], label="attention probability", shrink=0.8)
    return fig


def attention_grid(
    cache: AttentionCache, *, step: int | Sequence[int] | None = None, res: int | Sequence[int] | None = None,
    tokens: Sequence[str | int] | None = None, layer: str | None = None, seed: int | None = None,
    image=None, alpha: float = 0.6, max_columns: int = 6, ax=None,
) -> Figure:  # fmt: skip
    """Tokens × resolutions at one ``step``, or tokens × steps at one ``res``, on one colour scale.

    ``step=3`` → columns are ``res`` (default: every recorded resolution); ``res=16`` → columns are
    ``step`` (default: ``max_columns`` recorded steps spread over the schedule). Rows are ``tokens``
    (default: the subject tokens, else every recorded token). ``image`` overlays the maps.
    """
    one_step, one_res = isinstance(step, (int, np.integer)), isinstance(res, (int, np.integer))
    if one_step:
        columns = [("res", r) for r in (cache.resolutions if res is None else ([res] if one_res else list(res)))]
    elif one_res:
        steps = cache.steps if step is None else list(step)
        if step is None and len(steps) > max_columns:
            steps = [steps[k] for k in np.linspace(0, len(steps) - 1, max_columns).round().astype(int)]
        columns = [("step", s) for s in steps]
    else:
        raise AnelabError("give one step (a tokens x resolutions grid) or one res (a tokens x steps grid), e.g. step=0 or res=16")
    rows = [cache.token_index(t) for t in tokens] if tokens is not None else (cache.subjects or list(cache.tokens))
    heats = [
        [cache.maps(token=t, step=step if kind == "res" else v, res=v if kind == "res" else res, layer=layer, seed=seed) for kind, v in columns]
        for t in rows
    ]
    vmax = max(float(h.max()) for row in heats for h in row)
    fig, axes = _axes_grid(ax, len(rows), len(columns))
    picture = _image_of(image, cache, seed)
    for r, (token, row) in enumerate(zip(rows, heats)):
        for c, ((kind, v), heat) in enumerate(zip(columns, row)):
            mappable = _draw(axes[r, c], heat, picture, vmax, alpha)
            if r == 0:
                axes[r, c].set_title(f"res {v}" if kind == "res" else _step_label(cache, v), fontsize=9)
        axes[r, 0].set_ylabel(cache.tokens[token], fontsize=10)
    fig.colorbar(mappable, ax=axes, label="attention probability (shared scale)", shrink=0.8)
    fixed = _step_label(cache, step) if one_step else f"res {res} {'mean' if layer in (None, 'mean') else layer}"
    fig.suptitle(f"{cache.prompt!r} · seed {cache.seeds[cache.seed_row(seed)]} · {fixed}", fontsize=10)
    return fig


def attention_trends(
    runs: Mapping[str, pd.DataFrame] | pd.DataFrame, *, quantiles: Sequence[float] = DEFAULT_QUANTILES,
    resolutions: Sequence[int] | None = None, value: str = "max_attention", ax=None,
) -> Figure:  # fmt: skip
    """Quantiles over images of the higher- and lower-attended subject token's ``value`` per step,
    one panel per resolution, one colour per run (STUDIES.md 02, attention trends).

    ``runs``: ``{name: stats}`` (frames from :meth:`AttentionCache.stats`, concatenated over
    prompts), or one frame with a ``run`` column.
    """
    import seaborn as sns

    if isinstance(runs, Mapping):
        if not runs:
            raise AnelabError("attention_trends needs at least one run")
        stats = pd.concat([frame.assign(run=name) for name, frame in runs.items()], ignore_index=True)
    else:
        stats = runs if "run" in runs.columns else runs.assign(run="run")
    trends = quantile_trends(stats, quantiles, value, by=["run"])
    available = sorted(trends.res.unique(), reverse=True)
    resolutions = available if resolutions is None else list(resolutions)
    missing = [r for r in resolutions if r not in available]
    if missing:
        raise AnelabError(f"no statistics at resolution(s) {missing}; these runs have {available}")
    fig, axes = _axes_grid(ax, 1, len(resolutions), panel=3.4)
    widths = {q: w for q, w in zip(sorted(quantiles), np.linspace(0.6, 2.4, len(quantiles)))}
    for k, (panel, res) in enumerate(zip(axes[0], resolutions)):
        data = trends[trends.res == res].assign(quantile=lambda d: d["quantile"].map(lambda q: f"q{q:g}"))
        sns.lineplot(
            data=data, x="step", y="value", hue="run", style="token_rank", style_order=["higher", "lower"],
            size="quantile", sizes={f"q{q:g}": w for q, w in widths.items()}, ax=panel, legend=k == len(resolutions) - 1,
        )  # fmt: skip
        panel.set_title(f"resolution {res}", fontsize=10)
        panel.set_xlabel("denoising step (loop index)")
        panel.set_ylabel(f"smoothed max attention ({value})" if k == 0 else "")
        panel.set_ylim(0, 1.02)
        panel.grid(alpha=0.3)
    if panel.get_legend() is not None:
        panel.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
    n_images = int(trends.images.max())
    fig.suptitle(f"Quantiles over images ({n_images} per step) of the higher/lower-attended subject token", fontsize=10)
    return fig
