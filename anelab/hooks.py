"""Cross-attention capture through diffusers' attention-processor API.

A :class:`CaptureProcessor` sits on each cross-attention layer (``attn2``) that some caller may
want to read. While a *sink* is registered for its layer it computes softmax(QKᵀ·scale)
explicitly and hands the probabilities ``[B, heads, h·w, S]`` to the sink; otherwise it calls the
layer's original (fused SDPA) processor, so unread layers cost nothing extra. Guidance reads
through the explicit output (gradients flow through the probabilities); recording only
*observes* (the output stays the fused one, so a recorded sample is bit-identical to an
unrecorded one). Hook names are the
diffusers module paths minus ``.processor`` (reference §1.2 for what A&E reads).
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable, Iterable

import torch

from . import unet as unet_family

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
        """Execution order: a UNet's down, mid, up blocks (:mod:`anelab.unet`); a transformer's blocks
        (:func:`anelab.mmdit.execution_key`)."""
        key = unet_family.execution_key(self.name)
        if key is None:
            from . import mmdit  # imports this module

            key = mmdit.execution_key(self.name)
        return key


def cross_attention_layers(unet, latent_height: int, latent_width: int) -> list[Layer]:
    """Every cross-attention layer of a UNet2DConditionModel, in execution order, with its grid size."""
    return attention_layers(unet, latent_height, latent_width, cross=True)


def self_attention_layers(unet, latent_height: int, latent_width: int) -> list[Layer]:
    """Every self-attention layer (``attn1``) of the UNet's transformer blocks, in execution order, with its grid size."""
    return attention_layers(unet, latent_height, latent_width, cross=False)


def attention_layers(unet, latent_height: int, latent_width: int, cross: bool = True) -> list[Layer]:
    """The cross-attention (``attn2``) or self-attention (``attn1``) layers, in execution order, with their grid size."""
    return [Layer(*layer) for layer in unet_family.attention_layers(unet, latent_height, latent_width, cross)]


def layers_at(layers: Iterable[Layer], res: int) -> list[Layer]:
    return [layer for layer in layers if layer.res == res]


def _scores_inputs(attn, hidden_states, encoder_hidden_states, temb):
    """The processor's preamble: 3-D hidden states ``[B, n, c]`` and the text context, normalised as diffusers does."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.flatten(2).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    return hidden_states, encoder_hidden_states


def _heads(attn, x: torch.Tensor, batch: int) -> torch.Tensor:
    return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)  # [B, heads, n, d]


def _probs(attn, query: torch.Tensor, key: torch.Tensor, attention_mask, batch: int) -> torch.Tensor:
    """softmax(QKᵀ·scale) in fp32 or wider (fp64 pipelines keep fp64): [B, heads, query, key]."""
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    wide = torch.promote_types(query.dtype, torch.float32)  # at least fp32 (fp64 stays fp64)
    q, k = query.flatten(0, 1).to(wide), key.flatten(0, 1).to(wide)  # [B·heads, n, d]
    if attention_mask is None:
        scores = torch.baddbmm(
            q.new_empty(q.shape[0], q.shape[1], k.shape[1]), q, k.transpose(-1, -2), beta=0, alpha=attn.scale
        )
    else:
        mask = attn.prepare_attention_mask(attention_mask, k.shape[1], batch).to(wide)
        scores = torch.baddbmm(mask, q, k.transpose(-1, -2), beta=1, alpha=attn.scale)
    return scores.softmax(dim=-1).unflatten(0, (batch, attn.heads))


def attention_probs(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None) -> torch.Tensor:
    """The layer's attention probabilities ``[B, heads, query, key]`` (fp32), without its output."""
    x, context = _scores_inputs(attn, hidden_states, encoder_hidden_states, temb)
    batch = x.shape[0]
    return _probs(
        attn, _heads(attn, attn.to_q(x), batch), _heads(attn, attn.to_k(context), batch), attention_mask, batch
    )


def explicit_attention(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
    """Same result as diffusers' ``AttnProcessor2_0`` but returns the probabilities too.

    Returns ``(output, probs)`` with probs ``[B, heads, query, key]``; scores and softmax in fp32.
    """
    residual = hidden_states
    x, context = _scores_inputs(attn, hidden_states, encoder_hidden_states, temb)
    batch = x.shape[0]
    query, key, value = (_heads(attn, proj, batch) for proj in (attn.to_q(x), attn.to_k(context), attn.to_v(context)))
    probs = _probs(attn, query, key, attention_mask, batch)
    out = torch.matmul(probs.to(value.dtype), value)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * value.shape[-1])
    out = attn.to_out[1](attn.to_out[0](out))
    if residual.ndim == 4:
        out = out.transpose(-1, -2).reshape(residual.shape)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor, probs


class AttentionHooks:
    """Which layer's probabilities go where, set by the sampling loop before each UNet call."""

    def __init__(self):
        self.sinks: dict[str, Sink] = {}
        self.stop_after: str | None = None
        self.observe: slice | None = None

    @contextlib.contextmanager
    def reading(self, sinks: dict[str, Sink], stop_after: str | None = None, observe: slice | None = None):
        """Route the named layers to their sinks for one forward.

        ``stop_after``: end the forward after that layer (guidance reads nothing later).
        ``observe``: only watch these batch rows — each layer's output still comes from its own
        processor, so the forward's result is exactly what it is without hooks (recording).
        """
        self.sinks, self.stop_after, self.observe = sinks, stop_after, observe
        try:
            yield
        except StopForward:
            pass
        finally:
            self.sinks, self.stop_after, self.observe = {}, None, None


class CaptureProcessor:
    """Attention processor of one layer: explicit probabilities for a sink, else the original processor."""

    def __init__(self, name: str, hooks: AttentionHooks, fallback):
        self.name, self.hooks, self.fallback = name, hooks, fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        sink = self.hooks.sinks.get(self.name)
        if sink is None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        rows = self.hooks.observe
        if rows is not None:
            out = self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
            mask = None if attention_mask is None else attention_mask[rows]
            context = None if encoder_hidden_states is None else encoder_hidden_states[rows]
            sink(
                self.name,
                attention_probs(attn, hidden_states[rows], context, mask, None if temb is None else temb[rows]),
            )
            return out
        if self.name == self.hooks.stop_after:  # nothing reads this layer's output: its probabilities only
            sink(self.name, attention_probs(attn, hidden_states, encoder_hidden_states, attention_mask, temb))
            raise StopForward
        out, probs = explicit_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        sink(self.name, probs)
        return out


_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def attention_capture(unet, layers: Iterable[Layer | str], processor=CaptureProcessor):
    """Install capture processors on ``layers`` (every other layer keeps its own); restore on exit. ``processor``
    ``(name, hooks, fallback)`` builds one (a transformer's: :class:`anelab.mmdit.JointCapture`)."""
    wanted = {layer.name if isinstance(layer, Layer) else layer for layer in layers}
    original = unet.attn_processors
    hooks = _HOOKS.setdefault(unet, AttentionHooks())  # one per UNet: a CUDA graph captured through it stays valid
    unet.set_attn_processor(
        {
            key: processor(key.removesuffix(".processor"), hooks, proc)
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
        ordered = sorted(self.captured, key=lambda item: self._ORDER.get(unet_family.place(item[0]), 0))
        stacked = torch.cat([probs for _, probs in ordered], dim=1)  # [B, Σheads, hw, S]
        return (stacked.sum(dim=1) / stacked.shape[1]).unflatten(1, shape)
