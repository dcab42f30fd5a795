"""Cross-attention capture through diffusers' attention-processor API.

A :class:`CaptureProcessor` sits on each cross-attention layer (``attn2``) that some caller may
want to read. While a *sink* is registered for its layer it computes softmax(QKᵀ·scale)
explicitly and hands the probabilities ``[B, heads, h·w, S]`` to the sink; otherwise it calls the
layer's original (fused SDPA) processor, so unread layers cost nothing extra. Hook names are the
diffusers module paths minus ``.processor`` (reference §1.2 for what A&E reads).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Callable, Iterable

import torch

_NAME = re.compile(r"^(down_blocks|mid_block|up_blocks)\.?(\d*)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2$")
_PLACE = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}
_PLACE_ORDER = {"down": 0, "mid": 1, "up": 2}

Sink = Callable[[str, torch.Tensor], None]


class StopForward(Exception):
    """Raised after the last layer a caller reads: nothing later in the UNet can change what it reads."""


@dataclasses.dataclass(frozen=True)
class Layer:
    """One cross-attention layer: diffusers path, place in the UNet, attention grid ``(h, w)``."""

    name: str
    place: str
    shape: tuple[int, int]

    @property
    def res(self) -> int:
        """Side of the attention map (its width for non-square images)."""
        return self.shape[1]

    def sort_key(self) -> tuple:
        block, attention, transformer = (int(x or 0) for x in _NAME.match(self.name).groups()[1:])
        return (_PLACE_ORDER[self.place], block, attention, transformer)


def cross_attention_layers(unet, latent_height: int, latent_width: int) -> list[Layer]:
    """Every cross-attention layer of a UNet2DConditionModel, in execution order, with its grid size."""
    sizes, (h, w) = [], (latent_height, latent_width)
    for block in unet.down_blocks:
        sizes.append((h, w))
        if getattr(block, "downsamplers", None):
            h, w = math.ceil(h / 2), math.ceil(w / 2)  # stride-2 conv, padding 1
    n = len(sizes)
    layers = []
    for key in unet.attn_processors:
        name = key.removesuffix(".processor")
        match = _NAME.match(name)
        if not match or not getattr(unet.get_submodule(name), "is_cross_attention", False):
            continue
        kind, block = match.group(1), int(match.group(2) or 0)
        shape = (h, w) if kind == "mid_block" else sizes[block] if kind == "down_blocks" else sizes[n - 1 - block]
        layers.append(Layer(name, _PLACE[kind], shape))
    return sorted(layers, key=Layer.sort_key)


def layers_at(layers: Iterable[Layer], res: int) -> list[Layer]:
    return [layer for layer in layers if layer.res == res]


def explicit_attention(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
    """Same result as diffusers' ``AttnProcessor2_0`` but returns the probabilities too.

    Returns ``(output, probs)`` with probs ``[B, heads, query, key]``; scores and softmax in fp32.
    """
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        b, c, hh, ww = hidden_states.shape
        hidden_states = hidden_states.view(b, c, hh * ww).transpose(1, 2)
    batch = hidden_states.shape[0]
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    q, k = query.flatten(0, 1).float(), key.flatten(0, 1).float()  # [B·heads, n, d]
    if attention_mask is None:
        scores = torch.baddbmm(q.new_empty(q.shape[0], q.shape[1], k.shape[1]), q, k.transpose(-1, -2), beta=0, alpha=attn.scale)
    else:
        mask = attn.prepare_attention_mask(attention_mask, k.shape[1], batch).float()
        scores = torch.baddbmm(mask, q, k.transpose(-1, -2), beta=1, alpha=attn.scale)
    probs = scores.softmax(dim=-1).unflatten(0, (batch, attn.heads))  # [B, heads, q, k]
    out = torch.matmul(probs.to(value.dtype), value)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
    out = attn.to_out[1](attn.to_out[0](out))
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(b, c, hh, ww)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor, probs


class AttentionHooks:
    """Which layer's probabilities go where, set by the sampling loop before each UNet call."""

    def __init__(self):
        self.sinks: dict[str, Sink] = {}
        self.stop_after: str | None = None

    @contextlib.contextmanager
    def reading(self, sinks: dict[str, Sink], stop_after: str | None = None):
        """Route the named layers to their sinks for one forward; optionally stop after ``stop_after``."""
        self.sinks, self.stop_after = sinks, stop_after
        try:
            yield
        except StopForward:
            pass
        finally:
            self.sinks, self.stop_after = {}, None


class CaptureProcessor:
    """Attention processor of one layer: explicit probabilities for a sink, else the original processor."""

    def __init__(self, name: str, hooks: AttentionHooks, fallback):
        self.name, self.hooks, self.fallback = name, hooks, fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        sink = self.hooks.sinks.get(self.name)
        if sink is None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        out, probs = explicit_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        sink(self.name, probs)
        if self.name == self.hooks.stop_after:
            raise StopForward
        return out


@contextlib.contextmanager
def attention_capture(unet, layers: Iterable[Layer | str]):
    """Install capture processors on ``layers`` (every other layer keeps its own); restore on exit."""
    wanted = {layer.name if isinstance(layer, Layer) else layer for layer in layers}
    original = unet.attn_processors
    hooks = AttentionHooks()
    unet.set_attn_processor(
        {
            key: CaptureProcessor(key.removesuffix(".processor"), hooks, proc)
            if key.removesuffix(".processor") in wanted
            else proc
            for key, proc in original.items()
        }
    )
    try:
        yield hooks
    finally:
        unet.set_attn_processor(original)


class MeanAttention:
    """Sink that averages the probabilities of several layers over every (layer, head) map (§1.2).

    Maps are summed in the official order (up, down, mid blocks) so that results match the
    reference implementations bit for bit at batch size 1; the autograd graph keeps the
    probabilities alive anyway, so holding them costs no extra memory.
    """

    _ORDER = {"up": 0, "down": 1, "mid": 2}

    def __init__(self):
        self.captured: list[tuple[str, torch.Tensor]] = []

    def __call__(self, name: str, probs: torch.Tensor) -> None:  # probs [B, heads, hw, S]
        self.captured.append((name, probs))

    def maps(self, shape: tuple[int, int]) -> torch.Tensor:
        """Mean map ``[B, h, w, S]`` over every captured (layer, head)."""
        if not self.captured:
            raise RuntimeError("no attention was captured: the UNet never reached the requested layers")
        ordered = sorted(self.captured, key=lambda item: self._ORDER[_PLACE[item[0].split(".")[0]]])
        stacked = torch.cat([probs for _, probs in ordered], dim=1)  # [B, Σheads, hw, S]
        return (stacked.sum(dim=1) / stacked.shape[1]).unflatten(1, shape)
