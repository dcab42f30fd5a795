"""`attention_explorer`: ipywidgets controls over recorded :class:`AttentionCache` runs.

The controls are bound with ``interactive_output`` to :func:`anelab.plotting.attention_compare`:
one run or several side by side (rows, e.g. plain SD and A&E of one seed), one token or every
token in a row, on a colour scale fixed over steps by default. Sliders update on release
(``continuous_update=False``). A bad choice shows its message in the widget's output instead of
vanishing into the kernel log. Reports have no live kernel: put a static
:func:`~anelab.plotting.attention_compare` or :func:`~anelab.plotting.attention_grid` above the
widget cell.
"""

from __future__ import annotations

from collections.abc import Mapping

import ipywidgets as widgets
from IPython.display import Pretty, display

from .cache import MEAN, AttentionCache, short_layer_name
from .plotting import SCALES, VIEWS, attention_compare, named_runs, run_images

ALL = -1  # token control: every token side by side
HEAD_MEAN = "mean"  # head control: the head mean
NO_METHOD = ""  # objective control: none


def method_terms(cache: AttentionCache, method, *, step: int, seed: int | None = None) -> dict[str, list[float]]:
    """What ``method`` (a name or :func:`anelab.methods.get`) would compute on the maps ``cache`` recorded at ``step``
    for ``seed``: its terms as plain numbers (``loss`` first), its subjects those of the recorded run (nouns with their
    modifiers). Needs ``Record(tokens="all")`` and every resolution the method reads."""
    from . import methods

    method = methods.get(method) if isinstance(method, str) else method
    subjects = cache.meta.get("subjects") or [[s, []] for s in cache.subjects]
    eot = cache.meta.get("eot") or next((i for i, w in cache.tokens.items() if w == "<eot>"), None)
    if eot is None:
        raise ValueError("this recording does not say where <eot> is; record it with this anelab")
    terms = methods.evaluate(method, cache.text_maps(step=step, seed=seed), subjects, eot=eot, step=step)
    out = {"loss": terms["loss"][0].flatten().tolist()}
    for name, value in terms.items():
        if name not in ("loss", "state") and not name.startswith("_") and hasattr(value, "flatten"):
            out[name] = value[0].detach().flatten().tolist()
    return out


def _common(values_per_run: list[list]) -> list:
    """The values every run has, in the first run's order."""
    return [v for v in values_per_run[0] if all(v in other for other in values_per_run[1:])]


class AttentionExplorer(widgets.VBox):
    """Step / seed / resolution / layer / head / token / colour scale / view controls over one run or
    several (rows); ``figure`` is the last drawn, ``error`` the last failure (None after a good draw),
    ``renders`` counts draws."""

    def __init__(self, runs: AttentionCache | Mapping[str, AttentionCache], images=None):
        self.runs = named_runs(runs)
        self.images = run_images(images, self.runs)
        caches = list(self.runs.values())
        if not all(cache.has_maps for cache in caches):
            raise ValueError("the explorer needs recorded maps; record with anelab.Record(maps=True)")
        first = caches[0]
        steps, seeds = _common([c.steps for c in caches]), _common([c.seeds for c in caches])
        resolutions, self.tokens = _common([c.resolutions for c in caches]), _common([list(c.tokens) for c in caches])
        if not (steps and seeds and resolutions and self.tokens):
            raise ValueError("these runs share no recorded step, seed, resolution or token; record them alike")
        self.per_head = all(cache.per_head for cache in caches)
        self.figure, self.error, self.renders, self._quiet = None, None, 0, False
        wide = widgets.Layout(width="460px")
        step = widgets.SelectionSlider(
            options=[(f"{i} (t={first.timesteps[i]})", i) for i in steps],
            description="step",
            continuous_update=False,
            layout=wide,
        )
        seed = widgets.Dropdown(options=seeds, description="seed")
        opening = first.default_res if first.default_res in resolutions else resolutions[0]
        res = widgets.ToggleButtons(options=resolutions, value=opening, description="resolution")
        layer = widgets.Dropdown(options=self._layer_options(opening), description="layer", layout=wide)
        head = widgets.Dropdown(
            options=[("mean", HEAD_MEAN)],
            description="head",
            disabled=True,
            layout=widgets.Layout(display=None if self.per_head else "none"),
        )
        subject = next((t for t in first.subjects if t in self.tokens), self.tokens[0])
        token = widgets.Dropdown(
            options=[("every token, side by side", ALL)] + [(first.token_label(t), t) for t in self.tokens],
            value=subject,
            description="token",
        )
        scale = widgets.Dropdown(
            options=[(label, key) for key, label in SCALES.items()],
            value="token",
            description="colour scale",
            style={"description_width": "initial"},
            layout=widgets.Layout(width="360px"),
        )
        has_images = bool(self.images)
        view = widgets.Dropdown(
            options=[(label, key) for key, label in VIEWS.items()],
            value="over" if has_images else "map",
            description="view",
            disabled=not has_images,
        )
        from .methods import names

        objective = widgets.Dropdown(
            options=[("no objective", NO_METHOD)] + [(name, name) for name in names()],
            description="objective",
            tooltip="what a method's objective says about these maps (Record(tokens='all'))",
        )
        self.terms = None  # the last objective's terms
        self.controls = dict(
            step=step,
            seed=seed,
            res=res,
            layer=layer,
            head=head,
            token=token,
            scale=scale,
            view=view,
            objective=objective,
        )
        res.observe(self._res_changed, names="value")  # before interactive_output's observers: options change first
        layer.observe(self._layer_changed, names="value")
        self._layer_changed({"new": layer.value})
        self.output = widgets.interactive_output(self._render, self.controls)
        rows = [
            widgets.HBox([step, seed]),
            res,
            widgets.HBox([layer, head]),
            widgets.HBox([token, scale, view]),
            objective,
        ]
        super().__init__([*rows, self.output])

    def _layer_options(self, res: int) -> list[tuple[str, str]]:
        layers = _common([[x.name for x in cache.layers_at(res)] for cache in self.runs.values()])
        return [(f"{MEAN} of {len(layers)} layers", MEAN)] + [(short_layer_name(name), name) for name in layers]

    def _res_changed(self, change) -> None:
        self._quiet = True  # one draw per change: interactive_output's own res observer draws after this
        try:
            self.controls["layer"].options = self._layer_options(change["new"])
        finally:
            self._quiet = False

    def _layer_changed(self, change) -> None:
        name, head, layer = change["new"], self.controls["head"], self.controls["layer"]
        layer.tooltip = (
            "mean over every (layer, head) at this resolution: what the A&E loss reads" if name == MEAN else name
        )
        heads = self.runs[next(iter(self.runs))].heads.get(name, 0) if self.per_head and name != MEAN else 0
        quiet, self._quiet = self._quiet, True
        try:
            head.options = [("mean", HEAD_MEAN)] + [(f"head {k}", k) for k in range(heads)]
            head.disabled = not heads
        finally:
            self._quiet = quiet

    def _render(self, step, seed, res, layer, head, token, scale, view, objective) -> None:
        if self._quiet:
            return
        self.renders += 1
        try:
            fig = attention_compare(
                self.runs,
                step=step,
                seed=seed,
                res=res,
                layer=layer,
                head=None if head == HEAD_MEAN else head,
                tokens=self.tokens if token == ALL else [token],
                images=self.images or None,
                scale=scale,
                view=view,
            )
        except (ValueError, KeyError, IndexError) as error:  # shown in the output widget as text, not lost in a log
            self.error = f"cannot draw this choice: {error}"
            display(Pretty(self.error))
            return
        self.figure, self.error = fig, None
        display(fig)
        self.terms = None
        if objective != NO_METHOD:
            name, cache = next(iter(self.runs.items()))
            try:
                self.terms = method_terms(cache, objective, step=step, seed=seed)
            except (ValueError, KeyError) as error:  # AnelabError is a ValueError
                self.error = f"cannot evaluate {objective} here: {error}"
                display(Pretty(self.error))
                return
            shown = "; ".join(f"{k} " + " ".join(f"{v:.4g}" for v in values) for k, values in self.terms.items())
            display(Pretty(f"{objective} on {name}'s maps at step {step}: {shown}"))


def attention_explorer(runs: AttentionCache | Mapping[str, AttentionCache], images=None) -> AttentionExplorer:
    """Interactive view of one cache (``images``: one, or one per recorded seed) or of named runs side by side,
    ``attention_explorer({"SD": sd.attention, "A&E": ae.attention}, {"SD": sd.images, "A&E": ae.images})``."""
    return AttentionExplorer(runs, images)
