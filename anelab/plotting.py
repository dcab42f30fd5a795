"""Figures of recorded attention. Each function takes ``ax=None`` and returns the Figure.

Figures are built as ``matplotlib.figure.Figure`` objects (no pyplot state, no rcParams), so a
notebook shows each exactly once: where it is returned or ``display``-ed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .analysis import DEFAULT_QUANTILES, quantile_trends
from .cache import MEAN, AttentionCache, short_layer_name
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


def _label(panel, xlabel: str, ylabel: str, title: str, legend: str | None = "", grid: str = "both") -> None:
    """Axis labels, a title, a light grid and (unless ``legend`` is None) a legend outside the panel, titled ``legend``."""
    panel.set_xlabel(xlabel)
    panel.set_ylabel(ylabel)
    panel.set_title(title, fontsize=10)
    if legend is not None:
        panel.legend(title=legend or None, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    panel.grid(axis=grid, alpha=0.3)


SCALES = {"token": "shared across steps (this token)", "all": "shared (all tokens)", "map": "this map"}  # colour scales
VIEWS = {
    "over": "over the image (cells)",
    "smooth": "over the image (smoothed)",
    "beside": "image beside",
    "map": "map only",
}
EDGES_UP_TO = 16  # cell edges are drawn on maps up to this side (the coarse ones); finer grids would turn into a mesh


def _check(scale: str, view: str) -> None:
    if scale not in SCALES:
        raise AnelabError(
            f"scale must be one of {list(SCALES)} ({'; '.join(f'{k}: {v}' for k, v in SCALES.items())}), got {scale!r}"
        )
    if view not in VIEWS:
        raise AnelabError(
            f"view must be one of {list(VIEWS)} ({'; '.join(f'{k}: {v}' for k, v in VIEWS.items())}), got {view!r}"
        )


def _image_of(images, cache: AttentionCache, seed: int | None):
    """``images`` is one image, or one per recorded seed (list in ``cache.seeds`` order, or dict by seed)."""
    if images is None:
        return None
    if isinstance(images, Mapping):
        return images[cache.seeds[cache.seed_row(seed)]]
    if isinstance(images, (list, tuple)):
        if len(images) != len(cache.seeds):
            raise AnelabError(
                f"got {len(images)} images for {len(cache.seeds)} recorded seeds; pass one image or one per seed"
            )
        return images[cache.seed_row(seed)]
    return images


def named_runs(runs) -> dict[str, AttentionCache]:
    """``runs`` as ``{name: cache}``: one cache (named ``""``) or a mapping of named caches of one prompt."""
    named = dict(runs) if isinstance(runs, Mapping) else {"": runs}
    if not named or not all(isinstance(cache, AttentionCache) for cache in named.values()):
        raise AnelabError(
            "runs must be an AttentionCache or a non-empty {name: AttentionCache} mapping, e.g. {'SD': sd.attention, 'A&E': ae.attention}"
        )
    prompts = sorted({cache.prompt for cache in named.values()})
    if len(prompts) > 1:
        raise AnelabError(f"runs side by side must share one prompt (token positions differ otherwise); got {prompts}")
    return named


def run_images(images, named: Mapping[str, AttentionCache]) -> dict:
    """``images`` by run name: ``{name: images}`` (a name left out: no image), or for one unnamed run its images as they are."""
    if images is None:
        return {}
    if isinstance(images, Mapping) and images and set(images) <= set(named):
        return dict(images)
    if list(named) == [""]:
        return {"": images}
    raise AnelabError(f"with named runs pass images as {{name: images}} with names from {list(named)}")


def _cell_reader(values: np.ndarray):
    """``format_coord`` of a map drawn in cell coordinates: the cell under the cursor and its value."""
    h, w = values.shape

    def read(x: float, y: float) -> str:
        col, row = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        return (
            f"cell x={col}, y={row}: attention {values[row, col]:.4f}"
            if 0 <= row < h and 0 <= col < w
            else f"x={x:.1f}, y={y:.1f}"
        )

    return read


def _draw(ax, heat: torch.Tensor, *, image, vmax: float, alpha: float = 0.6, view: str = "over"):
    """One map ``[h, w]`` on ``ax`` in cell coordinates: ticks are cell indices, cell edges are drawn (sides up to
    ``EDGES_UP_TO``) and the cursor reads the cell's value. ``view="over"`` lays the cells over ``image``;
    ``"smooth"`` a bilinear upsampling of them (no edges); ``"beside"``, ``"map"`` or no image: the raw map."""
    h, w = heat.shape
    values = heat.numpy()
    style = dict(cmap=CMAP, vmin=0, vmax=vmax, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    over = image is not None and view in ("over", "smooth")
    if over:
        picture = np.asarray(image)
        ax.imshow(picture, extent=style["extent"])
    if over and view == "smooth":
        up = F.interpolate(heat[None, None], size=picture.shape[:2], mode="bilinear", align_corners=False)[0, 0]
        mappable = ax.imshow(up.numpy(), alpha=alpha, **style)
    else:
        mappable = ax.imshow(values, alpha=alpha if over else None, interpolation="nearest", **style)
    stride = -(-max(h, w) // 8)  # at most 8 labelled cells a side
    ax.set_xticks(range(0, w, stride))
    ax.set_yticks(range(0, h, stride))
    ax.tick_params(labelsize=6, length=2, pad=1)
    if max(h, w) <= EDGES_UP_TO and not (over and view == "smooth"):
        ax.set_xticks(np.arange(-0.5, w), minor=True)
        ax.set_yticks(np.arange(-0.5, h), minor=True)
        ax.tick_params(which="minor", length=0)
        ax.grid(which="minor", color="white", linewidth=0.4, alpha=0.5)
    ax.format_coord = _cell_reader(values)
    return mappable


def _picture(ax, image, title: str) -> None:
    """The generated image in a panel of its own (``view="beside"``); an empty panel without one."""
    if image is None:
        ax.set_axis_off()
        return
    ax.imshow(np.asarray(image))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def _vmax(caches: Sequence[AttentionCache], scale: str, heat: torch.Tensor, *, token, res, layer, seed, head) -> float:
    """Top of the colour scale: ``"map"`` the map's own maximum; ``"token"`` the token's maximum over every
    recorded step of every run; ``"all"`` the maximum over every recorded token too."""
    if scale == "map":
        return float(heat.max())
    tokens = [token] if scale == "token" else None
    return max(cache.vmax(tokens=tokens, res=res, layer=layer, seed=seed, head=head) for cache in caches)


def _step_label(cache: AttentionCache, step: int) -> str:
    return f"step {step} (t={cache.timesteps[step]})"


def _where(cache: AttentionCache, res: int | None, layer: str | None, head: int | None) -> str:
    """``res 16 mean``, or a layer's short name (``up 1.0``), and the head when one is chosen."""
    place = f"res {res} mean" if layer in (None, MEAN) else short_layer_name(cache.layer_name(layer))
    return place + ("" if head is None else f" · head {head}")


def attention_map(
    cache: AttentionCache,
    *,
    token: str | int,
    step: int,
    res: int | None = None,
    layer: str | None = None,
    head: int | None = None,
    seed: int | None = None,
    image=None,
    alpha: float = 0.6,
    scale: str = "token",
    vmax: float | None = None,
    view: str = "over",
    ax=None,
) -> Figure:
    """One token's recorded map (the mean at ``res``, a layer's — by path or short name — or one of its heads).

    Colour scale: ``vmax``, else ``scale`` (``SCALES``): ``"token"`` (default) the token's maximum over every
    recorded step, so maps of different steps compare by eye; ``"all"`` over every token too; ``"map"`` this
    map's own maximum. ``view`` (``VIEWS``): ``"over"`` the cells over ``image`` with their edges, ``"smooth"``
    bilinear over it, ``"beside"`` the raw map with the image in a panel of its own (two axes), ``"map"`` no image.
    Ticks are cell indices; the cursor reads the cell's value (ipympl / JupyterLab status bar).
    """
    _check(scale, view)
    where = dict(res=res, layer=layer, seed=seed, head=head)
    heat = cache.maps(token=token, step=step, **where)
    picture = _image_of(image, cache, seed) if view != "map" else None
    beside = int(picture is not None and view == "beside")
    fig, axes = _axes_grid(ax, 1, 1 + beside, panel=3.6)
    if beside:
        _picture(axes[0, 0], picture, "image")
    panel = axes[0, -1]
    top = vmax if vmax is not None else _vmax([cache], scale, heat, token=token, **where)
    mappable = _draw(panel, heat, image=picture, vmax=top, alpha=alpha, view=view)
    seed_label = cache.seeds[cache.seed_row(seed)]
    panel.set_title(
        f"'{cache.token_label(token)}' · {_where(cache, res, layer, head)}\n{_step_label(cache, step)} · seed {seed_label}",
        fontsize=9,
    )
    fig.colorbar(mappable, ax=panel, label=f"attention · {'fixed' if vmax is not None else SCALES[scale]}", shrink=0.8)
    return fig


def attention_grid(
    cache: AttentionCache,
    *,
    step: int | Sequence[int] | None = None,
    res: int | Sequence[int] | None = None,
    tokens: Sequence[str | int] | None = None,
    layer: str | None = None,
    head: int | None = None,
    seed: int | None = None,
    image=None,
    alpha: float = 0.6,
    max_columns: int = 6,
    vmax: float | None = None,
    view: str = "over",
    title: str = "",
    ax=None,
) -> Figure:
    """Tokens × resolutions at one ``step``, or tokens × steps at one ``res``, on one colour scale
    (``vmax``, else the largest map shown). ``title`` goes before the generated one (prompt, seed, step),
    e.g. the run's name.

    ``step=3`` → columns are ``res`` (default: every recorded resolution); ``res=16`` → columns are
    ``step`` (default: ``max_columns`` recorded steps spread over the schedule). Rows are ``tokens``
    (default: the subject tokens, else every recorded token). ``image`` with ``view`` as in :func:`attention_map`
    (``"beside"``: the image heads an extra first column).
    """
    _check("all", view)
    one_step, one_res = isinstance(step, (int, np.integer)), isinstance(res, (int, np.integer))
    if res is None and layer not in (None, MEAN):  # one layer: its own resolution
        res = next(x.res for x in cache.layers if x.name == cache.layer_name(layer))
        one_res = True
    if one_step:
        columns = [("res", r) for r in (cache.resolutions if res is None else ([res] if one_res else list(res)))]
    elif one_res:
        steps = cache.steps if step is None else list(step)
        if step is None and len(steps) > max_columns:
            steps = [steps[k] for k in np.linspace(0, len(steps) - 1, max_columns).round().astype(int)]
        columns = [("step", s) for s in steps]
    else:
        raise AnelabError(
            "give one step (a tokens x resolutions grid) or one res (a tokens x steps grid), e.g. step=0 or res=16"
        )
    rows = [cache.token_index(t) for t in tokens] if tokens is not None else (cache.subjects or list(cache.tokens))
    where = dict(layer=layer, head=head, seed=seed)
    heats = [
        [
            cache.maps(token=t, step=step if kind == "res" else v, res=v if kind == "res" else res, **where)
            for kind, v in columns
        ]
        for t in rows
    ]
    top = vmax if vmax is not None else max(float(h.max()) for row in heats for h in row)
    picture = _image_of(image, cache, seed) if view != "map" else None
    beside = int(picture is not None and view == "beside")
    fig, axes = _axes_grid(ax, len(rows), len(columns) + beside)
    for r, (token, row) in enumerate(zip(rows, heats)):
        if beside:
            _picture(axes[r, 0], picture if r == 0 else None, "image")
        for c, ((kind, v), heat) in enumerate(zip(columns, row)):
            mappable = _draw(axes[r, c + beside], heat, image=picture, vmax=top, alpha=alpha, view=view)
            if r == 0:
                axes[r, c + beside].set_title(f"res {v}" if kind == "res" else _step_label(cache, v), fontsize=9)
        axes[r, beside].set_ylabel(cache.token_label(token), fontsize=10)
    fig.colorbar(mappable, ax=axes[:, beside:], label="attention probability (shared scale)", shrink=0.8)
    chosen = layer not in (None, MEAN) or head is not None
    fixed = (
        _step_label(cache, step) + (f" · {_where(cache, res, layer, head)}" if chosen else "")
        if one_step
        else _where(cache, res, layer, head)
    )
    fig.suptitle(
        f"{title + ': ' if title else ''}{cache.prompt!r} · seed {cache.seeds[cache.seed_row(seed)]} · {fixed}",
        fontsize=10,
    )
    return fig


def attention_compare(
    runs: AttentionCache | Mapping[str, AttentionCache],
    *,
    step: int,
    res: int | None = None,
    tokens: Sequence[str | int] | None = None,
    layer: str | None = None,
    head: int | None = None,
    seed: int | None = None,
    images=None,
    alpha: float = 0.6,
    scale: str = "all",
    vmax: float | None = None,
    view: str = "over",
    title: str = "",
    ax=None,
) -> Figure:
    """Runs (rows) × tokens (columns) at one ``step`` and resolution, side by side: e.g. plain SD next to
    A&E for the same seed, ``attention_compare({"SD": sd.attention, "A&E": ae.attention}, step=10,
    images={"SD": sd.images, "A&E": ae.images})``. One unnamed cache gives a row of its tokens.

    ``res`` defaults to the first run's ``default_res`` (the guidance resolution), ``tokens`` to its subjects
    (else every recorded token). Colour scale: ``vmax``, else ``scale``: ``"all"`` (default) one scale for the
    figure, the largest map over every recorded step, token and run, so figures of other steps share it;
    ``"token"`` one per column (the token over steps and runs); ``"map"`` one per panel. ``view`` as in
    :func:`attention_map` (``"beside"``: each run's image heads its row).
    """
    named = named_runs(runs)
    pictures = run_images(images, named)
    _check(scale, view)
    caches, first = list(named.values()), next(iter(named.values()))
    if res is None and layer in (None, MEAN):
        res = first.default_res
    columns = [first.token_index(t) for t in tokens] if tokens is not None else (first.subjects or list(first.tokens))
    where = dict(res=res, layer=layer, seed=seed, head=head)
    beside = int(view == "beside" and bool(pictures))
    fig, axes = _axes_grid(ax, len(named), len(columns) + beside)
    panels = axes[:, beside:]
    for r, (name, cache) in enumerate(named.items()):
        picture = _image_of(pictures.get(name), cache, seed) if view != "map" else None
        if beside:
            _picture(axes[r, 0], picture, f"{name} image".strip())
        for c, token in enumerate(columns):
            heat = cache.maps(token=token, step=step, **where)
            top = (
                vmax if vmax is not None else _vmax(caches, scale, heat, token=token, **where)
            )  # "token"/"all": same for every run
            mappable = _draw(panels[r, c], heat, image=picture, vmax=top, alpha=alpha, view=view)
            panels[r, c].set_title(" · ".join(filter(None, [name, f"'{cache.token_label(token)}'"])), fontsize=9)
            if scale == "map" and vmax is None:
                fig.colorbar(mappable, ax=panels[r, c], shrink=0.8)
    if vmax is not None or scale == "all":
        fig.colorbar(
            mappable, ax=panels, label=f"attention · {'fixed' if vmax is not None else SCALES['all']}", shrink=0.8
        )
    elif scale == "token":
        for c, token in enumerate(columns):
            fig.colorbar(
                panels[-1, c].images[-1],
                ax=panels[:, c],
                location="bottom",
                shrink=0.8,
                label=f"'{first.token_label(token)}' (over steps)",
            )
    context = (
        f"seed {first.seeds[first.seed_row(seed)]} · {_step_label(first, step)} · {_where(first, res, layer, head)}"
    )
    note = f" · colour: {SCALES[scale]}" if vmax is None and scale != "all" else ""
    fig.suptitle(f"{title + ': ' if title else ''}{first.prompt!r} · {context}{note}", fontsize=10)
    return fig


def attention_trends(
    runs: Mapping[str, pd.DataFrame] | pd.DataFrame,
    *,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    resolutions: Sequence[int] | None = None,
    value: str = "max_attention",
    thresholds: Mapping[str, Mapping[int, float]] | None = None,
    ax=None,
) -> Figure:
    """Quantiles over images of the higher- and lower-attended subject token's ``value`` per denoising step
    (STUDIES.md 02, attention trends): one panel per (run, resolution), the quantiles as nested bands around
    the median (lightest = widest), higher subject in blue, lower in orange, and each run's threshold steps
    and values (``thresholds``: {run: {step: value}}) as dashed marks.

    ``runs``: ``{name: stats}`` (frames from :meth:`AttentionCache.stats`, concatenated over prompts), or one
    frame with a ``run`` column.
    """
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
    names = list(dict.fromkeys(stats.run))
    fig, axes = _axes_grid(ax, len(names), len(resolutions), panel=3.0)
    ordered = sorted(quantiles)
    colours = {"higher": "tab:blue", "lower": "tab:orange"}
    for r, name in enumerate(names):
        for c, res in enumerate(resolutions):
            panel = axes[r, c]
            part = trends[(trends.run == name) & (trends.res == res)]
            for rank, colour in colours.items():
                curves = {
                    q: part[(part.token_rank == rank) & (part["quantile"] == q)].sort_values("step") for q in ordered
                }
                median = curves[ordered[-1]]
                panel.plot(median.step, median.value, color=colour, lw=1.6, label=f"{rank} subject, q{ordered[-1]:g}")
                for k, q in enumerate(ordered[:-1]):  # each lower quantile bounds a band up to the top one
                    low = curves[q]
                    panel.fill_between(
                        low.step,
                        low.value,
                        median.value.to_numpy(),
                        color=colour,
                        alpha=0.12 + 0.08 * k,
                        lw=0,
                        label=f"{rank}: q{q:g}–q{ordered[-1]:g}" if r == 0 and c == len(resolutions) - 1 else None,
                    )
            for step, threshold in ((thresholds or {}).get(name) or {}).items():
                panel.axvline(step, color="grey", lw=0.6, ls=":")
                panel.plot([step], [threshold], marker="_", ms=14, mew=2, color="crimson")
            panel.set_ylim(0, 1.02)
            panel.xaxis.set_major_locator(MaxNLocator(integer=True))
            panel.grid(alpha=0.3)
            panel.set_title(f"{name} · resolution {res}", fontsize=9)
            panel.set_xlabel("denoising step (loop index)" if r == len(names) - 1 else "")
            panel.set_ylabel(f"smoothed max ({value})" if c == 0 else "")
    handles, labels = axes[0, -1].get_legend_handles_labels()
    if thresholds:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], marker="_", ms=14, mew=2, color="crimson", ls=""))
        labels.append("threshold")
    axes[0, -1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7, frameon=False)
    n_images = int(trends.images.max())
    fig.suptitle(f"Quantiles over images ({n_images} per step) of the higher- and lower-attended subject", fontsize=10)
    return fig


def cross_resolution_curves(effect: pd.DataFrame, ax=None) -> Figure:
    """How guiding at one resolution moves attention at the others, per step (STUDIES.md 02): one panel per
    guided variant, one curve per recorded resolution, each the lower subject's mean smoothed max minus
    plain SD's at that step (from :func:`anelab.analysis.cross_resolution_by_step`)."""
    variants = list(dict.fromkeys(effect.variant))
    if not variants:
        raise AnelabError("no guided variants in this effect table")
    fig, axes = _axes_grid(ax, 1, len(variants), panel=3.0)
    for panel, variant in zip(axes[0], variants):
        part = effect[effect.variant == variant]
        for res, curve in part.groupby("res"):
            panel.plot(curve.step, curve.difference, marker=".", label=f"res {res}")
        panel.axhline(0, color="black", lw=0.6)
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))
        _label(
            panel,
            "denoising step (loop index)",
            "lower subject: Δ smoothed max vs SD" if panel is axes[0, 0] else "",
            f"guided: {variant}",
            legend="recorded at" if panel is axes[0, -1] else None,
        )
    return fig


def measure_intervals(
    summary: pd.DataFrame,
    measure: str,
    hue: str = "variant",
    x: str = "category",
    descriptions: Mapping[str, str] | None = None,
    ax=None,
) -> Figure:
    """Mean of ``measure`` per ``x`` (category) and ``hue`` (variant) as points with 95% CI whiskers, from
    :func:`anelab.analysis.summarize` (points, not bars: the axis does not start at zero). ``descriptions``
    ({variant: what it is}) label the legend."""
    data = summary[summary.measure == measure]
    if data.empty:
        raise AnelabError(f"no rows for measure {measure!r}; have {sorted(summary.measure.unique())}")
    fig, axes = _axes_grid(ax, 1, 1, panel=4.0)
    panel = axes[0, 0]
    xs, hues = list(dict.fromkeys(data[x])), list(dict.fromkeys(data[hue]))
    width = 0.8 / len(hues)
    for k, name in enumerate(hues):
        part = data[data[hue] == name].set_index(x).reindex(xs)
        positions = np.arange(len(xs)) + (k - (len(hues) - 1) / 2) * width
        errors = np.vstack([part["mean"] - part.ci_low, part.ci_high - part["mean"]]).clip(min=0)
        label = f"{name}: {descriptions[name]}" if descriptions and name in descriptions else str(name)
        panel.errorbar(positions, part["mean"], yerr=np.nan_to_num(errors), fmt="o", capsize=3, label=label)
    panel.set_xticks(np.arange(len(xs)), xs, rotation=15)
    panel.set_xlim(-0.5, len(xs) - 0.5)
    _label(panel, x, f"{measure} (mean, 95% CI)", f"{measure} by {x} and {hue}", legend=hue, grid="y")
    return fig


def paired_intervals(differences: pd.DataFrame, measure: str, by: str = "category", ax=None) -> Figure:
    """Paired differences from plain SD (:func:`anelab.analysis.paired_differences`) of one measure: per ``by``
    value and variant, the mean difference with its 95% CI; zero (no change) is the dashed line."""
    data = differences[differences.measure == measure].rename(columns={"difference": "mean"})
    if data.empty:
        raise AnelabError(f"no differences for measure {measure!r}")
    fig = measure_intervals(data.assign(measure=measure), measure, hue="variant", x=by, ax=ax)
    panel = fig.axes[0]
    panel.axhline(0, color="black", lw=0.8, ls="--")
    panel.set_ylabel(f"{measure}: variant − SD (paired, 95% CI)")
    panel.set_title(f"{measure}: difference from plain SD on the same seeds", fontsize=10)
    return fig


def image_grid(
    images: Sequence,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str = "",
    captions: Sequence[str] | None = None,
    marks: Sequence | None = None,
    panel: float = 2.6,
    ax=None,
) -> Figure:
    """Images (PIL, arrays or paths) in ``len(row_labels) x len(col_labels)`` order, labelled; ``captions``
    (one per image) go under the tiles (e.g. scores), ``marks`` (one per image: None, or a point (x, y) in
    [0, 1] image coordinates) are drawn as a cross (a layout target)."""
    from PIL import Image

    rows, cols = len(row_labels), len(col_labels)
    if len(images) != rows * cols:
        raise AnelabError(f"image_grid needs {rows}x{cols} = {rows * cols} images, got {len(images)}")
    fig, axes = _axes_grid(ax, rows, cols, panel=panel)
    for k, image in enumerate(images):
        tile = axes[k // cols, k % cols]
        picture = np.asarray(Image.open(image).convert("RGB") if isinstance(image, (str, Path)) else image)
        tile.imshow(picture)
        tile.set_xticks([])
        tile.set_yticks([])
        if marks is not None and marks[k] is not None:
            h, w = picture.shape[:2]
            tile.plot([marks[k][0] * w], [marks[k][1] * h], marker="x", ms=12, mew=3, color="red")
        if captions is not None and captions[k]:
            tile.set_xlabel(captions[k], fontsize=7)
        if k // cols == 0:
            tile.set_title(col_labels[k % cols], fontsize=8)
        if k % cols == 0:
            tile.set_ylabel(row_labels[k // cols], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def guidance_rates(stats: pd.DataFrame, hue: str = "variant", max_step: int | None = None, ax=None) -> Figure:
    """Guidance rate and success rate at each threshold step (the denoising loop index), one series per
    ``hue`` with Wilson 95% intervals; every success point is labelled with its n (triggered pairs), every
    threshold step gets a tick (from :func:`anelab.analysis.guidance_stats`)."""
    per_step = stats[stats.step.notna()].astype({"step": int})
    if per_step.empty:
        raise AnelabError("no threshold steps in these guidance statistics")
    fig, axes = _axes_grid(ax, 1, 2, panel=3.8)
    names = list(dict.fromkeys(per_step[hue]))
    offsets = np.linspace(-0.25, 0.25, len(names)) if len(names) > 1 else [0.0]
    for panel, column, n_column, label in zip(
        axes[0],
        ("guidance_rate", "success_rate"),
        ("pairs", "triggered"),
        ("guidance rate (share of pairs triggered)", "success rate (share of triggered reaching)"),
    ):
        for name, offset in zip(names, offsets):
            part = per_step[per_step[hue] == name].sort_values("step")
            low, high = part[f"{column}_low"], part[f"{column}_high"]
            errors = np.vstack([part[column] - low, high - part[column]]).clip(min=0)
            panel.errorbar(
                part.step + offset,
                part[column],
                yerr=np.nan_to_num(errors),
                fmt="o-",
                ms=4,
                capsize=2,
                lw=1,
                label=str(name),
            )
            if column == "success_rate":
                for step, value, n in zip(part.step, part[column], part[n_column]):
                    if not np.isnan(value):
                        panel.annotate(
                            f"n={n}", (step + offset, value), textcoords="offset points", xytext=(3, 4), fontsize=6
                        )
        steps = sorted(per_step.step.unique())
        panel.set_xticks(steps)
        panel.set_xlim(-1, max(max_step or 0, max(steps)) + 1)
        panel.set_ylim(-0.03, 1.05)
        _label(
            panel, "threshold step (denoising loop index)", label, label, legend=hue if panel is axes[0, 1] else None
        )
    return fig


def step_size_schedules(configs: Mapping, n_iterations: int = 51, ax=None) -> Figure:
    """α_i over the loop for each named GuidanceConfig, up to its last regular update, its threshold steps marked."""
    fig, axes = _axes_grid(ax, 1, 1, panel=4.6)
    panel = axes[0, 0]
    for name, config in configs.items():
        if config is None:
            continue
        alphas = config.step_sizes(n_iterations)[: min(config.last_update_iteration(n_iterations), n_iterations)]
        line = panel.plot(np.arange(len(alphas)), alphas, label=str(name))[0]
        steps = [s for s in config.thresholds if s < len(alphas)]
        panel.plot(steps, alphas[steps], "o", ms=4, color=line.get_color())
    panel.xaxis.set_major_locator(MaxNLocator(integer=True))
    _label(
        panel,
        "loop index i (dots: threshold steps)",
        "step size α_i",
        "Step-size schedules (regular updates)",
        legend="variant",
    )
    return fig


def tradeoff(frame: pd.DataFrame, x: str, measures: Sequence[str], log_x: bool = False, ax=None) -> Figure:
    """Each measure against a swept parameter ``x`` (one panel per measure; ``log_x`` for doubling sweeps)."""
    fig, axes = _axes_grid(ax, 1, len(measures), panel=3.0)
    ordered = frame.sort_values(x)
    for panel, measure in zip(axes[0], measures):
        panel.plot(ordered[x], ordered[measure], marker="o")
        if log_x:
            panel.set_xscale("log", base=2)
            panel.set_xticks(ordered[x].tolist(), [f"{v:g}" for v in ordered[x]])
        panel.set_xlabel(x + (" (log scale)" if log_x else ""))
        panel.set_ylabel(measure)
        panel.set_title(f"{measure} vs {x}", fontsize=10)
        panel.grid(alpha=0.3)
    return fig


def method_costs(costs: pd.DataFrame, measures: Sequence[str], x: str = "x_sd", ax=None) -> Figure:
    """Each method's mean ``measures`` against its cost (``x``: seconds per image as a multiple of plain SD's), one
    panel per measure, every point labelled with its variant (:func:`anelab.analysis.method_table`)."""
    if not measures:
        raise AnelabError("method_costs needs at least one measure")
    fig, axes = _axes_grid(ax, 1, len(measures), panel=3.4)
    table = costs.reset_index() if "variant" not in costs else costs
    cost = table[x].fillna(1.0)  # plain SD: 1x itself
    for panel, measure in zip(axes[0], measures):
        panel.scatter(cost, table[measure])
        for name, cx, cy in zip(table["variant"], cost, table[measure]):
            panel.annotate(str(name), (cx, cy), textcoords="offset points", xytext=(4, 4), fontsize=8)
        _label(panel, "time per image (x plain SD)", f"{measure} (mean)", f"{measure} vs cost", legend=None)
    return fig


def attention_box(
    steered: pd.DataFrame, variants: Sequence[str], bound: float | None = None, title: str = "", ax=None
) -> Figure:
    """Per-image smoothed max attention of a steered subject (rows of :func:`anelab.analysis.steered_subject`)
    per variant as box plots, with the suppression bound as a dashed line."""
    missing = [v for v in variants if v not in set(steered.variant)]
    if missing:
        raise AnelabError(f"no rows for variants {missing}; have {sorted(steered.variant.unique())}")
    fig, axes = _axes_grid(ax, 1, 1, panel=4.4)
    panel = axes[0, 0]
    values = [steered.loc[steered.variant == v, "max_attention"].to_numpy() for v in variants]
    panel.boxplot(values, tick_labels=list(variants), showmeans=True)
    if bound is not None:
        panel.axhline(bound, color="grey", ls="--", label=f"suppress_bound {bound}")
        panel.legend(fontsize=8, loc="upper right")
    panel.set_xlabel("variant")
    panel.set_ylabel("smoothed max attention (per image)")
    panel.set_title(title or "Smoothed max attention of the steered subject", fontsize=10)
    panel.tick_params(axis="x", rotation=15)
    panel.grid(axis="y", alpha=0.3)
    return fig


def layout_arrows(layout: pd.DataFrame, ax=None) -> Figure:
    """Mean attention centroid of the reference run (arrow start) and of each steered run (arrow end)
    with its target (cross), image coordinates (x right, y down), from :func:`anelab.analysis.layout_table`."""
    fig, axes = _axes_grid(ax, 1, 1, panel=4.4)
    panel = axes[0, 0]
    colours = iter(["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"] * 4)
    reference = layout[layout.run == "reference"].iloc[0]
    panel.scatter(
        [reference.centroid_x],
        [reference.centroid_y],
        marker="o",
        s=40,
        color="black",
        label=f"{reference.variant} (reference)",
    )
    for name, rows in layout.groupby("target", sort=False):
        start, end = rows.set_index("run").loc["reference"], rows.set_index("run").loc["steered"]
        colour = next(colours)
        panel.annotate(
            "",
            xy=(end.centroid_x, end.centroid_y),
            xytext=(start.centroid_x, start.centroid_y),
            arrowprops=dict(arrowstyle="->", color=colour, lw=1.5, shrinkA=0, shrinkB=0),
        )
        panel.scatter([end.centroid_x], [end.centroid_y], marker="o", s=25, color=colour, label=f"{name} (steered)")
        panel.scatter([end.target_x], [end.target_y], marker="x", s=70, color=colour, label=f"{name} target")
    panel.set_xlim(0, 1)
    panel.set_ylim(1, 0)  # y down, as in the image
    panel.set_aspect("equal")
    _label(
        panel,
        "centroid x (0 = left, 1 = right)",
        "centroid y (0 = top, 1 = bottom)",
        "Attention centroid: reference (arrow start) → steered (arrow end)",
    )
    return fig


def sweep_images(
    results: pd.DataFrame,
    variants: Sequence[str],
    examples: int | Sequence[tuple[str, int]] = 3,
    title: str = "",
    caption: Sequence[str] = ("min_object", "all_present"),
    marks: Mapping[str, tuple[float, float]] | None = None,
    ax=None,
) -> Figure:
    """(prompt, seed) pairs of a study (columns: the first ``examples``, or the pairs given) under each variant
    (rows), from :func:`anelab.runs.load_results`; each tile captioned with its ``caption`` scores, and a
    variant's layout target marked (``marks``: {variant: (x, y)})."""
    missing = [v for v in variants if v not in set(results.variant)]
    if missing:
        raise AnelabError(f"variant(s) {missing} are not in these results ({sorted(set(results.variant))})")
    if isinstance(examples, int):
        pairs = list(
            results.drop_duplicates(["prompt", "seed"])
            .head(examples)[["prompt", "seed"]]
            .itertuples(index=False, name=None)
        )
    else:
        pairs = [tuple(p) for p in examples]
    table = results.set_index(["variant", "prompt", "seed"])
    shown = [c for c in caption if c in table.columns]
    images, captions = [], []
    for v in variants:
        for p, s in pairs:
            row = table.loc[(v, p, s)]
            images.append(row.image)
            captions.append(" · ".join(f"{c} {row[c]:.3g}" for c in shown if pd.notna(row[c])))
    tile_marks = [(marks or {}).get(v) for v in variants for _ in pairs]
    return image_grid(
        images,
        list(variants),
        [f"{p} · seed {s}" for p, s in pairs],
        title=title,
        captions=captions,
        marks=tile_marks,
        ax=ax,
    )


def architecture_comparison(
    comparison: pd.DataFrame, profile: pd.DataFrame, measure: str = "min_object", ax=None
) -> Figure:
    """Across models (06, architectures), against the image pixels per attention cell (the same fraction of the
    image on every model; each point labelled with its resolution): plain SD's lower-subject smoothed max
    (:func:`anelab.analysis.attention_profile`), A&E's paired ``measure`` difference from the model's plain SD with
    its 95% CI, and the guidance rate (:func:`anelab.analysis.architecture_comparison`); one colour per model."""
    if comparison.empty and profile.empty:
        raise AnelabError("nothing to compare: no guided variant and no plain-SD statistics")
    fig, axes = _axes_grid(ax, 1, 3, panel=3.2)
    models = list(dict.fromkeys([*profile.model, *comparison.model]))
    colours = {m: f"C{k}" for k, m in enumerate(models)}
    panels = [
        (axes[0, 0], profile, "lower", None, "plain SD: lower subject's smoothed max"),
        (axes[0, 1], comparison, "difference", "ci", f"A&E − SD: {measure} (paired, 95% CI)"),
        (axes[0, 2], comparison, "guidance_rate", None, "A&E: guidance rate"),
    ]
    ticks = sorted({*profile.px_per_cell, *comparison.px_per_cell})
    for panel, frame, column, interval, title in panels:
        for model in models:
            part = frame[frame.model == model].sort_values("px_per_cell")
            if part.empty:
                continue
            if interval:
                low, high = (part[column] - part.ci_low).fillna(0), (part.ci_high - part[column]).fillna(0)
                panel.errorbar(
                    part.px_per_cell,
                    part[column],
                    yerr=[low, high],
                    marker="o",
                    capsize=3,
                    color=colours[model],
                    label=model,
                )
            else:
                panel.plot(part.px_per_cell, part[column], marker="o", color=colours[model], label=model)
            for x, y, res in zip(part.px_per_cell, part[column], part.res):
                if pd.notna(y):
                    panel.annotate(
                        str(int(res)),
                        (x, y),
                        textcoords="offset points",
                        xytext=(3, 3),
                        fontsize=7,
                        color=colours[model],
                    )
        if column == "difference":
            panel.axhline(0, color="black", lw=0.8, ls="--")
        panel.set_xscale("log", base=2)
        if ticks:
            panel.set_xticks(ticks, [f"{t:g}" for t in ticks])
            panel.minorticks_off()
        _label(panel, "image px per attention cell", column, title, legend="model" if panel is axes[0, 2] else None)
    fig.suptitle(
        "Which resolution carries the subjects, and where guidance works, per architecture (point labels: resolution)",
        fontsize=10,
    )
    return fig


def block_localisation(profile: pd.DataFrame, ax=None) -> Figure:
    """Which blocks localise a subject (from :func:`anelab.analysis.block_localisation`): per model, the lower
    subject's mean smoothed max attention against the block index (solid) and the higher one's (dashed); FLUX's
    single-stream blocks are drawn with open markers."""
    models = list(dict.fromkeys(profile.model))
    if not models:
        raise AnelabError("no transformer blocks in this profile")
    fig, axes = _axes_grid(ax, 1, len(models), panel=3.0)
    for panel, name in zip(axes[0], models):
        part = profile[profile.model == name]
        line = panel.plot(part.block, part.lower, marker="o", label="lower subject")[0]
        panel.plot(part.block, part.higher, ls="--", color=line.get_color(), label="higher subject")
        single = part[part.place == "single"]
        panel.scatter(single.block, single.lower, facecolors="white", edgecolors=line.get_color(), zorder=3)
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))
        _label(
            panel,
            "block (execution order)",
            "smoothed max attention (mean)" if panel is axes[0, 0] else "",
            name,
            legend="" if panel is axes[0, -1] else None,
        )
    return fig
