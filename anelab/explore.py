"""`attention_explorer`: ipywidgets controls over a recorded :class:`AttentionCache`.

The controls are bound with ``interactive_output`` to :func:`anelab.plotting.attention_map`;
sliders update on release (``continuous_update=False``). A bad choice shows its message in the
widget's output instead of vanishing into the kernel log. Reports have no live kernel: put a
static :func:`~anelab.plotting.attention_grid` above the widget cell.
"""

from __future__ import annotations

import ipywidgets as widgets
from IPython.display import display

from .cache import MEAN, AttentionCache
from .plotting import attention_map


class AttentionExplorer(widgets.VBox):
    """Step / resolution / token / layer / seed controls over one map; ``figure`` is the last drawn."""

    def __init__(self, cache: AttentionCache, images=None):
        if not cache.has_maps:
            raise ValueError("the explorer needs recorded maps; record with anelab.Record(maps=True)")
        self.cache, self.images = cache, images
        self.figure, self.error, self.renders = None, None, 0
        step = widgets.SelectionSlider(
            options=[(f"{i} (t={cache.timesteps[i]})", i) for i in cache.steps],
            description="step", continuous_update=False, layout=widgets.Layout(width="480px"),
        )  # fmt: skip
        res = widgets.ToggleButtons(options=cache.resolutions, description="resolution")
        first = cache.subjects[0] if cache.subjects else next(iter(cache.tokens))
        token = widgets.Dropdown(options=[(word, i) for i, word in cache.tokens.items()], value=first, description="token")
        layer = widgets.Dropdown(options=self._layer_options(res.value), description="layer", layout=widgets.Layout(width="460px"))
        seed = widgets.Dropdown(options=cache.seeds, description="seed")
        overlay = widgets.Checkbox(value=images is not None, description="over image", disabled=images is None)
        res.observe(lambda change: setattr(layer, "options", self._layer_options(change["new"])), names="value")  # before the redraw
        self.controls = dict(step=step, res=res, token=token, layer=layer, seed=seed, overlay=overlay)
        self.output = widgets.interactive_output(self._render, self.controls)
        rows = [widgets.HBox([step, seed]), res, widgets.HBox([token, layer, overlay])]
        super().__init__([*rows, self.output])

    def _layer_options(self, res: int) -> list[tuple[str, str]]:
        return [(f"{MEAN} of {len(self.cache.layers_at(res))} layers", MEAN)] + [
            (layer.name, layer.name) for layer in self.cache.layers_at(res)
        ]

    def _render(self, step, res, token, layer, seed, overlay):
        self.renders += 1
        try:
            fig = attention_map(self.cache, token=token, step=step, res=res, layer=layer, seed=seed, image=self.images if overlay else None)
        except (ValueError, KeyError, IndexError) as error:  # shown in the output widget, not lost in a log
            self.error = f"cannot draw this choice: {error}"
            print(self.error)
            return
        self.figure, self.error = fig, None
        display(fig)


def attention_explorer(cache: AttentionCache, images=None) -> AttentionExplorer:
    """Interactive view of ``cache`` (optionally over ``images``: one, or one per recorded seed)."""
    return AttentionExplorer(cache, images)
