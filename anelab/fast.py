"""The fast path on CUDA: channels-last convolutions, and the sampling loop's fixed-shape work replayed from CUDA graphs.

At batch 1 on a GPU the sampling loop is bound by launching thousands of small kernels from Python,
not by the kernels (issue "GPU speed": 0.61 s of kernels in 1.4 s for plain SD's 50 steps on an H200),
and a quarter of the kernel time is cuDNN converting fp16 NCHW tensors to NHWC and back. So:

- :func:`channels_last` stores the UNet's and the VAE's weights channels-last (the convolutions then
  need no layout conversion);
- :class:`StaticGraph` captures one function of fixed-shape tensors — the CFG forward of a step, or
  A&E's measurement *with its backward* (forward to the last read layer, loss, ∇z) — and replays it:
  inputs are copied into the graph's static tensors, the captured kernels run, the outputs are copied
  out. Replaying runs the eager path's kernels on the same values: results agree to float noise (some
  backward kernels use atomics, so bit-for-bit equality is not promised on a GPU).
- :class:`GraphCache` keeps the graphs of one pipeline between :func:`anelab.generate` calls (one per
  input shape and per guidance set-up, at most ``size`` of each kind), sharing one memory pool. A
  graph is only reused while the UNet is the one it was captured from: same modules and settings, same
  parameter storage, same attention processors, same kernel flags (:func:`fingerprint`); otherwise the
  cache starts again. One pipeline, one thread: two threads sampling with one UNet share its graphs.

At recorded steps the CFG forward's graph also outputs the recorded layers' probabilities (observed
beside each layer's own output); the recorder processes them after the replay. What cannot be a graph
stays eager: refinement's data-dependent loop control (which samples go on is decided on the host, at
threshold steps only) and its forwards on part of the batch (a capture costs four passes; a subset's
size is used a few times at most), and the two-stage layout update (two gradients of one forward).
On by default when the UNet is on CUDA (``generate(..., fast=None)``), off on the CPU, where neither
part helps.

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

    Capture follows torch's recipe, on one side ``stream`` of the inputs' device: warm-up calls first
    (cuDNN autotuning, cuBLAS workspaces for that stream and autograd's device threads start outside
    the capture, so none of them lands in the graph's memory pool), then one call under
    ``torch.cuda.graph``. ``fn`` must not synchronise with the host (no ``.item()``, no host-to-device
    copies): what it reads from Python is frozen at capture. With ``capture=False`` ``fn`` runs on the
    static tensors at each call (the CPU stand-in)."""

    WARMUP = 3

    def __init__(self, fn: Callable[[Tensors], Tensors], inputs: Tensors, *, capture: bool, pool=None, stream=None):
        self.static = {k: v.detach().clone() for k, v in inputs.items()}
        self.device = next(iter(self.static.values())).device
        self.fn, self.graph, self.outputs = fn, None, None
        if capture:
            main = torch.cuda.current_stream(self.device)
            with torch.cuda.device(self.device), torch.cuda.stream(stream):  # restored even if the capture fails
                stream.wait_stream(main)  # the static inputs were written on the main stream
                for _ in range(self.WARMUP):
                    fn(self.static)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, pool=pool, stream=stream):
                    outputs = fn(self.static)
            main.wait_stream(stream)
            self.outputs = {k: None if v is None else v.detach() for k, v in outputs.items()}
            self.fn = None  # the graph is all that runs now (and the run that captured it can be freed)

    def __call__(self, inputs: Tensors) -> Tensors:
        with torch.no_grad():
            for key, value in inputs.items():
                self.static[key].copy_(value)
        if self.graph is None:
            outputs = self.fn(self.static)
        else:
            with torch.cuda.device(self.device):
                self.graph.replay()
            outputs = self.outputs
        return {k: None if v is None else v.detach().clone() for k, v in outputs.items()}


def signature(inputs: Tensors) -> tuple:
    """What a graph's static inputs fix: each tensor's name, shape, dtype and device."""
    return tuple((k, tuple(v.shape), v.dtype, str(v.device)) for k, v in inputs.items())


def fingerprint(unet: torch.nn.Module) -> int:
    """The UNet as a captured graph knows it: its modules and their plain settings (``training``, FreeU's
    ``s1``…``b2``, LoRA ``scaling``…), where and how its parameters are stored, its attention processors,
    and torch's kernel choices (TF32, attention backends, cuDNN)."""
    modules = tuple((name, type(m).__name__, _settings(m)) for name, m in unet.named_modules())
    storage = tuple((p.data_ptr(), tuple(p.shape), p.stride(), p.dtype) for p in unet.parameters())
    processors = tuple(type(p).__name__ for p in unet.attn_processors.values())
    backends = torch.backends
    flags = (
        backends.cuda.matmul.allow_tf32,
        backends.cudnn.allow_tf32,
        backends.cudnn.benchmark,
        backends.cudnn.deterministic,
        backends.cuda.flash_sdp_enabled(),
        backends.cuda.mem_efficient_sdp_enabled(),
        backends.cuda.math_sdp_enabled(),
    )
    return hash((modules, storage, processors, flags))


def _settings(module: torch.nn.Module) -> tuple:
    """A module's public attributes that are plain values (or dicts of them): what can change its forward in place."""
    plain = (bool, int, float, str, type(None))
    return tuple(
        (k, tuple(sorted(v.items())) if isinstance(v, dict) else v)
        for k, v in sorted(vars(module).items())
        if not k.startswith("_")
        and (isinstance(v, plain) or isinstance(v, dict) and all(isinstance(x, plain) for x in v.values()))
    )


class GraphCache:
    """The CUDA graphs of one UNet, kept between runs (see the module docstring). All share one memory
    pool and one capture stream; replays never overlap and every output is copied out at once, so sharing
    is safe in any order. A failed capture turns graphs off for this UNet (with one warning): the
    failure can leave the pool mid-capture, and every later capture would fail the same way."""

    def __init__(self, size: int = 4):
        self.size, self.key, self.pool, self.stream, self.broken = size, None, None, None, None
        self.graphs: collections.OrderedDict = collections.OrderedDict()

    def get(self, kind: str, key, fn: Callable[[Tensors], Tensors], inputs: Tensors, capture: bool):
        """The graph of ``fn`` for ``(kind, key, input signature)``, captured on first use; None once a
        capture failed (the caller then runs eagerly)."""
        full = (kind, key, signature(inputs))
        if full in self.graphs:
            self.graphs.move_to_end(full)
            return self.graphs[full]
        if capture and self.broken:
            return None
        if capture and self.pool is None:
            device = next(iter(inputs.values())).device
            self.pool, self.stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(device)
        try:
            graph = StaticGraph(fn, inputs, capture=capture, pool=self.pool, stream=self.stream)
        except Exception as error:  # noqa: BLE001 - any capture failure falls back to the eager path
            if not capture:
                raise
            self.broken = f"{kind}: {type(error).__name__}: {error}"
            self.graphs.clear()
            self.pool = self.stream = None
            warnings.warn(
                f"CUDA graph capture of the {kind} failed ({type(error).__name__}: {error}); this UNet runs eagerly",
                stacklevel=3,
            )
            return None
        self.graphs[full] = graph
        if sum(k[0] == kind for k in self.graphs) > self.size:
            del self.graphs[next(k for k in self.graphs if k[0] == kind)]
        return graph

    def check(self, unet) -> None:
        """Forget every graph (and their pool) if ``unet`` is no longer the UNet they were captured from."""
        key = fingerprint(unet)
        if key != self.key:
            self.graphs.clear()
            self.pool = self.stream = self.broken = None
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
