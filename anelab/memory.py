"""Less memory for the guided backward: diffusers' gradient checkpointing, except where guidance reads.

A&E's measurement (``_Sampler.measure``) runs the UNet with autograd on, up to the last layer the loss
reads, so every activation of that prefix is held for the backward: 330 MiB in bf16 for SD-1.4's UNet at
512 px, batch 1, against about 130 MiB of plain SD's whole CFG step (issue "GPU speed"). Almost all of
it belongs to blocks the loss does not read (the 64×64 and 32×32 blocks when guidance reads 16×16).

:func:`checkpointed` turns on diffusers' own gradient checkpointing (``enable_gradient_checkpointing``,
which wraps every resnet and every transformer block in ``torch.utils.checkpoint``) with one exception:
a transformer block whose cross-attention guidance reads runs normally, so its attention is captured
once, in the forward, exactly as without checkpointing; only its self-attention and feed-forward are
checkpointed. The backward then recomputes the blocks one at a time (more time, the same numbers):
78 MiB held instead of 330 at 16×16 guidance, 1.36× the guided step's time on a CPU. :class:`HeldForBackward` measures the peak of what is held for a
backward, on any device.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterable

import torch
import torch.utils.checkpoint

from .errors import AnelabError

ENV = "ANELAB_LOW_MEMORY"  # set by the CLI's --low-memory; read by every generate() call that leaves low_memory=None


def requested(low_memory: bool | None) -> bool:
    """``low_memory`` as given, or (None) from ``$ANELAB_LOW_MEMORY`` (1/true/yes/on or 0/false/no/off, unset: off)."""
    if low_memory is None:
        text = os.environ.get(ENV, "").strip().lower()
        if text not in ("", "0", "false", "no", "off", "1", "true", "yes", "on"):
            raise AnelabError(f"${ENV} must be 1/true/yes/on or 0/false/no/off, got {text!r}")
        return text in ("1", "true", "yes", "on")
    if not isinstance(low_memory, bool):
        raise AnelabError(f"low_memory must be True, False or None (${ENV}), got {low_memory!r}")
    return low_memory


@contextlib.contextmanager
def checkpointed(unet, read: Iterable[str]):
    """Within the block, grad-enabled forwards of ``unet`` checkpoint every resnet and transformer block
    except those holding a read layer (``read``: cross-attention layer names, ``…transformer_blocks.N.attn2``);
    in those, the self-attention and the feed-forward are checkpointed on their own. The UNet's own
    checkpointing settings are restored on exit."""
    read = set(read)
    blocks = {name: unet.get_submodule(name) for name in sorted({layer.rpartition(".")[0] for layer in read})}
    keep = {id(block) for block in blocks.values()}

    def run(module, *args):
        if id(module) in keep:
            return module(*args)
        return _checkpoint(module, *args)

    settings = [
        (m, m.gradient_checkpointing, getattr(m, "_gradient_checkpointing_func", None))
        for m in unet.modules()
        if hasattr(m, "gradient_checkpointing")
    ]
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=run)
    parts = [  # a read self-attention (InitNO) runs as it is: its maps are what the objective differentiates
        (block, part)
        for name, block in blocks.items()
        for part in ("attn1", "ff", "ff_context")  # SD 3 / FLUX blocks: the text stream's feed-forward too
        if getattr(block, part, None) is not None and f"{name}.{part}" not in read
    ]
    for block, part in parts:  # the child is wrapped, its own forward untouched (processors stay on it)
        setattr(block, part, Checkpointed(getattr(block, part)))
    try:
        yield
    finally:
        for block, part in parts:
            setattr(block, part, getattr(block, part).inner)
        for module, enabled, func in settings:
            module.gradient_checkpointing = enabled
            if func is None:
                del module._gradient_checkpointing_func
            else:
                module._gradient_checkpointing_func = func


def _checkpoint(function, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(
        function, *args, use_reentrant=False, preserve_rng_state=False, **kwargs
    )  # no dropout in a UNet at inference: no random state to replay


class Checkpointed(torch.nn.Module):
    """A child module run through ``torch.utils.checkpoint`` when autograd records (the guided forward), as it is
    otherwise (CFG): what :func:`checkpointed` puts in place of a read block's self-attention and feed-forward."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            return _checkpoint(self.inner, *args, **kwargs)
        return self.inner(*args, **kwargs)


class HeldForBackward:
    """Context: the peak memory of the tensors autograd holds for a backward while the block runs (each
    storage counted once; ``exclude``: tensors not to count, e.g. the model's parameters). Device-independent:
    on the CPU it measures what the GPU's allocator would hold for the same graph. ``peak`` in bytes.

    A checkpoint's inputs are counted (``torch.utils.checkpoint`` saves them through autograd); what its
    backward recomputes, one block at a time, is not: that is working memory of the backward, not held."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.live: dict[int, list[int]] = {}  # storage address -> [holders, bytes]
        self.current = self.peak = 0

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda held: held.tensor)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if address in self.exclude:
            return _Held(tensor)
        entry = self.live.setdefault(address, [0, storage.nbytes()])
        if entry[0] == 0:
            self.current += entry[1]
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        held = _Held(tensor)
        weakref.finalize(held, self._release, address)  # autograd drops the holder with the graph
        return held

    def _release(self, address: int) -> None:
        entry = self.live[address]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[address]


class _Held:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
