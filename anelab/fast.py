"""The fast path on CUDA: channels-last convolutions, and the sampling loop's fixed-shape work replayed from CUDA graphs.

At batch 1 on a GPU the sampling loop is bound by launching thousands of small kernels from Python,
not by the kernels (issue "GPU speed": 0.61 s of kernels in 1.4 s for plain SD's 50 steps on an H200),
and a quarter of the kernel time is cuDNN converting fp16 NCHW tensors to NHWC and back. So:

- :func:`channels_last` stores the UNet's and the VAE's weights channels-last (the convolutions then
  need no layout conversion);
- :class:`StaticGraph` captures one function of fixed-shape tensors — the CFG forward of a step, or
  A&E's measurement *with its backward* (forward to the last read layer, loss, ∇z) — and replays it:
  inputs are copied into the graph's static tensors, the captured kernels run, the outputs are copied
  out. Replaying runs exactly the captured kernels, so results equal the eager path's.
- :class:`GraphCache` keeps the graphs of one pipeline between :func:`anelab.generate` calls (one per
  input shape and per guidance set-up, at most ``size`` of each kind), sharing one memory pool. A
  graph is only reused while the UNet is the one it was captured from: same modules, same parameter
  storage, same attention processors (:func:`fingerprint`); otherwise the cache starts again.

What cannot be a graph stays eager: steps whose attention the recorder reads, refinement's data-dependent
loop control (which samples go on is decided on the host, at threshold steps only), and the two-stage
layout update (two gradients of one forward). On by default when the UNet is on CUDA
(``generate(..., fast=None)``), off on the CPU, where neither part helps.

On the CPU, ``StaticGraph(capture=False)`` runs the same function on the same static tensors at every
call instead of replaying a graph. The tests use it to check the path's plumbing (static inputs, cache
keys, outputs) against the eager loop without a GPU.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable

import torch


def available(device: torch.device) -> bool:
    """Whether the fast path can run on ``device`` (CUDA only)."""
    return device.type == "cuda" and torch.cuda.is_available()


def channels_last(*modules: torch.nn.Module) -> None:
    """Store each module's 4-D weights channels-last (a no-op for the values: only the memory layout changes)."""
    for module in modules:
        module.to(memory_format=torch.channels_last)


Tensors = dict[str, torch.Tensor]


class StaticGraph:
    """``fn(static) -> {name: tensor}`` on fixed-shape inputs, captured once and replayed.

    Capture follows torch's recipe: three warm-up calls on a side stream (cuDNN autotuning, cuBLAS
    workspaces and autograd's device threads start outside the capture), then one call under
    ``torch.cuda.graph``. ``fn`` must not synchronise with the host (no ``.item()``, no host-to-device
    copies): what it reads from Python is frozen at capture. With ``capture=False`` ``fn`` runs on the
    static tensors at each call (the CPU stand-in)."""

    WARMUP = 3

    def __init__(self, fn: Callable[[Tensors], Tensors], inputs: Tensors, *, capture: bool, pool=None):
        self.fn, self.capture = fn, capture
        self.static = {k: v.detach().clone() for k, v in inputs.items()}
        self.graph = self.outputs = None
        if capture:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.WARMUP):
                    fn(self.static)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.outputs = fn(self.static)

    def __call__(self, inputs: Tensors) -> Tensors:
        with torch.no_grad():
            for key, value in inputs.items():
                self.static[key].copy_(value)
        if self.graph is None:
            outputs = self.fn(self.static)
        else:
            self.graph.replay()
            outputs = self.outputs
        return {k: None if v is None else v.detach().clone() for k, v in outputs.items()}


def signature(inputs: Tensors) -> tuple:
    """What a graph's static inputs fix: each tensor's name, shape, dtype and device."""
    return tuple((k, tuple(v.shape), v.dtype, str(v.device)) for k, v in inputs.items())


def fingerprint(unet: torch.nn.Module) -> tuple:
    """The UNet as a captured graph knows it: its modules, where its parameters live, its attention processors."""
    modules = tuple((name, type(m).__name__) for name, m in unet.named_modules())
    storage = tuple((p.data_ptr(), tuple(p.shape), p.dtype) for p in unet.parameters())
    processors = tuple(type(p).__name__ for p in unet.attn_processors.values())
    return hash((modules, storage, processors))


class GraphCache:
    """The CUDA graphs of one UNet, kept between runs (see the module docstring)."""

    def __init__(self, size: int = 4):
        self.size, self.key, self.pool = size, None, None
        self.graphs: collections.OrderedDict = collections.OrderedDict()
        self.failed: set = set()

    def get(self, kind: str, key, fn: Callable[[Tensors], Tensors], inputs: Tensors, capture: bool):
        """The graph of ``fn`` for ``(kind, key, input signature)``, captured on first use; None where capture
        failed (the caller then runs eagerly; one warning says why)."""
        full = (kind, key, signature(inputs))
        if full in self.failed:
            return None
        if full in self.graphs:
            self.graphs.move_to_end(full)
            return self.graphs[full]
        if capture and self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            graph = StaticGraph(fn, inputs, capture=capture, pool=self.pool)
        except Exception as error:  # noqa: BLE001 - any capture failure falls back to the eager path
            if not capture:
                raise
            self.failed.add(full)
            warnings.warn(
                f"CUDA graph capture of the {kind} failed ({type(error).__name__}: {error}); it runs eagerly",
                stacklevel=3,
            )
            return None
        self.graphs[full] = graph
        if sum(k[0] == kind for k in self.graphs) > self.size:
            del self.graphs[next(k for k in self.graphs if k[0] == kind)]
        return graph

    def check(self, unet) -> None:
        """Forget every graph if ``unet`` is no longer the UNet they were captured from."""
        key = fingerprint(unet)
        if key != self.key:
            self.graphs.clear()
            self.failed.clear()
            self.key = key

    def __reduce__(self):  # a copied or pickled UNet starts with no graphs
        return GraphCache, (self.size,)


def graph_cache(unet) -> GraphCache:
    """The :class:`GraphCache` of ``unet``, checked against it. It lives on the UNet (an attribute: its graphs
    hold the UNet, so a weak mapping would keep it alive forever) and goes with it."""
    cache = unet.__dict__.setdefault("_anelab_graphs", GraphCache())
    cache.check(unet)
    return cache


def flat(kwargs: dict, prefix: str = "") -> Tensors:
    """``{"encoder_hidden_states": e, "added_cond_kwargs": {"text_embeds": p}}`` → ``{"encoder_hidden_states": e, "added_cond_kwargs.text_embeds": p}``."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def nested(static: Tensors, skip: tuple[str, ...] = ()) -> dict:
    """The UNet's keyword arguments back from flat static tensors (the names in ``skip`` left out)."""
    out: dict = {}
    for key, value in static.items():
        if key in skip:
            continue
        *path, name = key.split(".")
        target = out
        for part in path:
            target = target.setdefault(part, {})
        target[name] = value
    return out
