"""`generate`: Stable Diffusion with Attend-and-Excite guidance, batched over seeds.

Reading order: :func:`generate` validates everything into a :class:`RunPlan` (:func:`plan_run`), then
:meth:`_Sampler.run` is the denoising loop. Each loop iteration ``i`` does (reference §1.7):

1. :meth:`_Sampler.guide` — only on iterations that can change the latent
   (``i < max_iter_to_alter`` or ``i`` a threshold step):
   a. :meth:`_Sampler.measure` (:class:`_Measurer`): conditional-only UNet forward at the current latent
      (no CFG), stopped after the last layer at ``attention_res``; smoothed max attention per subject
      token and the loss ``max_s (1 − m_s)``;
   b. at a threshold step, :meth:`_Sampler.refine` for the samples below it (§1.8);
   c. one regular step ``z ← z − α_i ∇L`` while ``i < max_iter_to_alter`` (skipped where L = 0).
2. :meth:`_Sampler.denoise` — the usual CFG prediction on the *updated* latent and the scheduler step.

Guidance works on the latent as the UNet sees it, ``scheduler.scale_model_input(z)``: the identity for
the PNDM and DDIM schedulers of SD 1.x and 2.x (so this is the official code's update, §1.6), ``z/√(σ²+1)``
for SDXL's Euler, whose step ``α_i`` then acts on the UNet's input as it does on SD 1.x. What the UNet
takes besides latent and timestep (text embeddings; SDXL's pooled embeddings and size/crop ids) comes
from :class:`anelab.models.Conditioning`.

Every seed in the batch carries its own refinement state; seed ``s`` starts from the noise of
``torch.Generator(generator_device).manual_seed(s)`` exactly as a single-seed run does. The trace of
each guided step stays on the device (:class:`anelab.trace.TraceLog`) and the NaN check of the latents
is read once at the end: no host synchronisation per step beyond the refinement decisions. On CUDA
the CFG forward and the measurement with its gradient are replayed from CUDA graphs (:mod:`anelab.fast`);
``low_memory`` recomputes the measurement's unread blocks in its backward (:mod:`anelab.memory`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm  # text bars everywhere: a notebook widget bar leaves "model not found" in saved notebooks

from . import fast as fast_path
from . import hooks as hk
from . import memory, models
from .cache import AttentionCache
from .checks import is_int, is_number, require_number, require_seeds
from .config import GuidanceConfig
from .errors import AnelabError
from .objectives import excite_loss, gaussian_target, layout_kl, suppress_loss, token_maps
from .recording import Record, Recorder, RecordPlan, plan_record
from .tokens import eot_index, prompt_tokens, resolve_tokens
from .trace import TRACE_COLUMNS, TraceLog

__all__ = ["GuidedOutput", "RunPlan", "TRACE_COLUMNS", "generate", "plan_run"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
GENERATOR_DEVICES = ("cpu", "cuda")  # where each seed's initial noise is drawn (the official code: "cuda")


@dataclasses.dataclass
class GuidedOutput:
    """What :func:`generate` returns. ``images`` is None for ``output_type="latent"``."""

    images: list | np.ndarray | torch.Tensor | None
    latents: torch.Tensor  # [n_seeds, 4, h/8, w/8], final
    trace: pd.DataFrame  # one row per (seed, guided step, token), columns TRACE_COLUMNS
    attention: AttentionCache | None = None  # when record= was given
    seeds: list[int] = dataclasses.field(default_factory=list)
    prompt: str = ""
    token_indices: list[int] = dataclasses.field(default_factory=list)
    timesteps: list[int] = dataclasses.field(default_factory=list)
    seconds: float = 0.0  # wall time of sampling + decoding, all seeds

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / max(len(self.seeds), 1)


@dataclasses.dataclass
class RunPlan:
    """Everything :func:`generate` decided before denoising starts (:func:`plan_run` builds it)."""

    prompt: str
    token_indices: list[int]  # excited
    suppress_indices: list[int]
    layout: dict[int, tuple[float, float]]  # position -> target point (x, y)
    measured: list[int]  # excited, then suppressed, then layout-only positions: the columns of m
    roles: list[str]  # per measured position
    token_words: list[str]  # per measured position
    layout_targets: torch.Tensor | None  # [L, h, w] target densities on the guidance grid, layout order
    eot: int
    seeds: list[int]
    config: GuidanceConfig | None
    guidance_scale: float
    height: int
    width: int
    timesteps: list[int]
    step_sizes: np.ndarray
    guidance_layers: list[hk.Layer]  # those at config.attention_res, execution order
    normaliser: GuidanceConfig  # config (or the defaults) with the softmax columns this model uses (§1.3, models.softmax_tokens)
    record: RecordPlan | None  # what to record of the CFG forward
    generator_device: str = "cpu"
    fast: bool = False  # CUDA graphs for the CFG forward and the guided step (anelab.fast)
    low_memory: bool = False  # checkpoint the guided forward's unread blocks (anelab.memory)


def generate(
    pipe,
    prompt: str,
    tokens: Sequence[str | int] = (),
    seeds: Sequence[int] = (0,),
    config: GuidanceConfig | None = None,
    *,
    suppress: Sequence[str | int] = (),
    layout: Mapping[str | int, tuple[float, float]] | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    output_type: str = "pil",
    record: Record | None = None,
    generator_device: str = "cpu",
    fast: bool | None = None,
    low_memory: bool | None = None,
    progress: bool = True,
) -> GuidedOutput:
    """Sample ``prompt`` for every seed at once; A&E-guided on ``tokens`` unless ``config`` is None.

    ``tokens`` are words of the prompt or CLIP positions (``<sot>`` = 0). ``config=None`` is plain
    Stable Diffusion with the same seeds. ``suppress=["dog"]`` pushes those tokens' attention down;
    ``layout={"cat": (x, y)}`` pulls a token's attention towards a point (x right, y down, in [0, 1]).
    ``record=Record(...)`` keeps cross-attention maps and token statistics of the CFG forward in
    ``out.attention``. ``generator_device="cuda"`` draws each seed's noise with
    ``torch.Generator("cuda")`` as the official code does (the paper's images); the default CPU
    generator gives the same noise on every machine. ``fast`` (default: on CUDA) replays the CFG forward
    and A&E's measurement with its gradient from CUDA graphs (:mod:`anelab.fast`; same results).
    ``low_memory=True`` holds about a quarter of the activations for A&E's backward and recomputes
    the rest (:mod:`anelab.memory`; same results, more time; None: ``$ANELAB_LOW_MEMORY``). See the
    module docstring for the loop.
    """
    plan = plan_run(
        pipe,
        prompt,
        tokens=tokens,
        seeds=seeds,
        config=config,
        suppress=suppress,
        layout=layout,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        output_type=output_type,
        record=record,
        generator_device=generator_device,
        fast=fast,
        low_memory=low_memory,
    )
    recorder = Recorder(plan.record, prompt, plan.seeds) if plan.record else None
    hooked = plan.guidance_layers + (plan.record.layers if plan.record else [])
    graphs = fast_path.graph_cache(pipe.unet) if plan.fast else None  # before the capture processors go in
    start = time.perf_counter()
    with (
        torch.no_grad(),
        _frozen(pipe.unet),
        hk.attention_capture(pipe.unet, hooked) as hooks,
        memory.checkpointed(pipe.unet, [layer.name for layer in plan.guidance_layers])
        if plan.low_memory
        else contextlib.nullcontext(),
    ):
        sampler = _Sampler(pipe, plan, hooks, recorder, graphs)
        latents = sampler.run(num_inference_steps, progress)
        images = None if output_type == "latent" else _decode(pipe, latents, output_type)
    seconds = time.perf_counter() - start
    attention = None
    if recorder:
        meta = {
            "config": None if config is None else config.to_dict(),
            "record": record.to_dict(),
            "guidance_scale": plan.guidance_scale,
            "height": plan.height,
            "width": plan.width,
            "num_inference_steps": int(num_inference_steps),
        }
        attention = recorder.cache(meta)
    return GuidedOutput(
        images=images,
        latents=latents,
        trace=sampler.traces.frame(),
        attention=attention,
        seeds=plan.seeds,
        prompt=prompt,
        token_indices=plan.token_indices,
        timesteps=plan.timesteps,
        seconds=seconds,
    )


class _Measure:
    """One conditional-only forward at a latent ``leaf``: smoothed max attention ``m`` [B,T] of the
    measured tokens, the excite ``loss`` [B], the ``suppressed`` tokens' maxima [B,U], the layout
    ``kl`` [B,L] and the ``objective`` [B] the update descends; ``grad`` once :meth:`gradient` ran."""

    FIELDS = ("m", "loss", "objective", "suppressed", "kl")

    def __init__(self, leaf, m, loss, objective=None, suppressed=None, kl=None, grad=None):
        self.leaf, self.m, self.loss, self.suppressed, self.kl, self.grad = leaf, m, loss, suppressed, kl, grad
        self.nonfinite = None
        self.objective = loss if objective is None else objective  # excite only: the objective *is* the loss

    def gradient(self) -> torch.Tensor:
        """∇_z objective per sample (samples are independent in the UNet, so ∇ of the sum splits).

        fp16 safety: a sample whose objective or gradient is NaN/inf gets a zero gradient (its latent
        is not moved) and is flagged in ``nonfinite``; the trace reports it."""
        if self.grad is None:
            with torch.enable_grad():
                grad = torch.autograd.grad(self.objective.sum(), self.leaf)[0]
            self.nonfinite = ~torch.isfinite(grad).flatten(1).all(dim=1) | ~torch.isfinite(self.objective.detach())
            self.grad = torch.where(self.nonfinite[:, None, None, None], torch.zeros_like(grad), grad)
        return self.grad

    def violates(self, threshold: float, bound: float) -> torch.Tensor:
        """[B] bool: an excited token is below ``threshold`` or a suppressed one above ``max(bound, 1 − threshold)``."""
        out = self.loss > max(0.0, 1.0 - threshold)
        if self.suppressed is not None:
            out = out | (self.suppressed.amax(dim=-1) > max(bound, 1.0 - threshold))
        return out

    def outputs(self) -> dict[str, torch.Tensor | None]:
        """The measurement with its gradient as plain tensors: what a captured graph of it returns."""
        self.gradient()
        return {f: getattr(self, f) for f in self.FIELDS} | {"grad": self.grad, "nonfinite": self.nonfinite}

    @classmethod
    def from_outputs(cls, out: dict) -> "_Measure":
        measure = cls(None, **{f: out[f] for f in cls.FIELDS}, grad=out["grad"])
        measure.nonfinite = out["nonfinite"]
        return measure

    def detached(self, grad: torch.Tensor | None) -> "_Measure":
        copy = {f: None if getattr(self, f) is None else getattr(self, f).detach().clone() for f in self.FIELDS}
        return _Measure(None, **copy, grad=grad)

    def put(self, rows: torch.Tensor, other: "_Measure", which: torch.Tensor) -> None:
        """Rows ``rows`` of this (detached) measure take ``other``'s rows ``which`` (its gradient too, if kept)."""
        for f in self.FIELDS:
            if getattr(self, f) is not None:
                getattr(self, f)[rows] = getattr(other, f).detach()[which]
        if self.grad is not None:
            self.grad[rows] = other.grad[which]


class _Measurer:
    """A&E's measurement (§1.6): the conditional-only UNet forward at a latent ``z`` (already scaled as
    the UNet's input), stopped after the last ``attention_res`` layer; the smoothed max attention of
    every measured token and the objectives (:class:`_Measure`).

    It holds only what is fixed for a run's guidance set-up (the UNet, the hooks, the plan), so a CUDA
    graph captured through it can be replayed by later runs with the same :meth:`key`; the latent, the
    timestep, the text conditioning and the layout targets are its inputs."""

    def __init__(self, unet, hooks: hk.AttentionHooks, plan: RunPlan):
        self.unet, self.hooks, self.plan, self.config = unet, hooks, plan, plan.config

    def key(self) -> tuple:
        """Everything :meth:`__call__` reads besides its inputs (a graph of it is valid for this key only)."""
        plan, cfg, norm = self.plan, self.config, self.plan.normaliser
        return (
            tuple(layer.name for layer in plan.guidance_layers),
            tuple(plan.measured),
            len(plan.token_indices),
            len(plan.suppress_indices),
            tuple(plan.measured.index(i) for i in plan.layout),
            plan.eot,
            (norm.softmax_tokens, norm.temperature, norm.smooth, norm.kernel_size, norm.sigma, norm.sigma_convention),
            (cfg.suppress_scale, cfg.suppress_bound, cfg.layout_scale, cfg.layout_update),
            plan.low_memory,
        )

    def __call__(self, z: torch.Tensor, t, unet_kwargs: dict, layout_targets: torch.Tensor | None) -> _Measure:
        leaf = z.detach().requires_grad_(True)
        mean = hk.MeanAttention()
        plan, cfg, layers = self.plan, self.config, self.plan.guidance_layers
        with torch.enable_grad():
            with self.hooks.reading({layer.name: mean for layer in layers}, stop_after=layers[-1].name):
                self.unet(leaf, t, **unet_kwargs)
            maps = token_maps(mean.maps(layers[0].shape), plan.measured, plan.eot, plan.normaliser)  # [B, T, h, w]
            m = maps.flatten(2).amax(dim=-1)
            n_excite, n_suppress = len(plan.token_indices), len(plan.suppress_indices)
            loss = excite_loss(m[:, :n_excite]) if n_excite else m.new_zeros(len(m))
            objective, suppressed, kl = loss, None, None
            if n_suppress:
                suppressed = m[:, n_excite : n_excite + n_suppress]
                objective = objective + cfg.suppress_scale * suppress_loss(suppressed, cfg.suppress_bound)
            if plan.layout:
                picked = torch.stack([maps[:, plan.measured.index(i)] for i in plan.layout], dim=1)
                kl = layout_kl(picked, layout_targets)
                if cfg.layout_update == "joint":  # two_stage: the KL moves the latent first, in its own step
                    objective = objective + cfg.layout_scale * kl.sum(dim=-1)
            return _Measure(leaf, m, loss, objective, suppressed, kl)

    def graphable(self, static: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """:meth:`__call__` and the gradient, as a function of a graph's static inputs."""
        kwargs = fast_path.nested(static, skip=("z", "t", "layout_targets"))
        return self(static["z"], static["t"], kwargs, static.get("layout_targets")).outputs()


class _Sampler:
    """The denoising loop of one :func:`generate` call (module docstring)."""

    def __init__(
        self,
        pipe,
        plan: RunPlan,
        hooks: hk.AttentionHooks,
        recorder: Recorder | None = None,
        graphs: fast_path.GraphCache | None = None,
    ):
        self.pipe, self.plan, self.hooks, self.unet, self.recorder = pipe, plan, hooks, pipe.unet, recorder
        self.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # stateful: own copy
        self.device, self.dtype = pipe.unet.device, pipe.unet.dtype
        self.cfg = plan.guidance_scale > 1.0
        self.conditioning = models.Conditioning.encode(
            pipe, plan.prompt, height=plan.height, width=plan.width, cfg=self.cfg, device=self.device, dtype=self.dtype
        )
        self.config = plan.config
        self.last_update = plan.config.last_update_iteration(len(plan.timesteps)) if plan.config else 0
        self.traces = TraceLog(
            seeds=plan.seeds, measured=plan.measured, roles=plan.roles, words=plan.token_words, layout=list(plan.layout)
        )
        self.broken_at = None  # per sample: first loop index whose latent was not finite (-1: none)
        self.nonfinite_steps = torch.zeros((), dtype=torch.long, device=self.device)  # guided steps with a NaN gradient
        self.measurer = _Measurer(self.unet, hooks, plan) if plan.config else None
        self.layout_targets = None if plan.layout_targets is None else plan.layout_targets.to(self.device)
        self.graphs = graphs  # the fast path's CUDA graphs (None: eager)
        self.capture = self.device.type == "cuda"  # elsewhere StaticGraph runs its function (the tests' stand-in)

    # -- the loop -----------------------------------------------------------------------------
    def run(self, num_inference_steps: int, progress: bool) -> torch.Tensor:
        self.scheduler.set_timesteps(
            num_inference_steps, device=self.device
        )  # first: Euler's init_noise_sigma depends on it
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        z = self.initial_latents()
        steps = self.scheduler.timesteps
        self.host_timesteps = (
            steps if steps.is_meta else steps.cpu()
        )  # what the scheduler's step reads: no GPU round trip
        self.broken_at = torch.full((len(z),), -1, dtype=torch.long, device=z.device)
        label = "A&E" if self.config else "SD"
        for i, t in enumerate(tqdm(self.scheduler.timesteps, desc=label, disable=not progress, leave=False)):
            if self.config is not None and (i < self.last_update or i in self.config.thresholds):
                scale = float(self.scheduler.scale_model_input(torch.ones(()), t))  # the UNet's input is z * scale
                z = self.guide(z, i, t) if scale == 1.0 else self.guide(z * scale, i, t) / scale
            z = self.denoise(z, i, t)
        self.check_finite()
        return z

    def initial_latents(self) -> torch.Tensor:
        """Each seed's noise from its own generator on ``plan.generator_device``, drawn as diffusers'
        ``randn_tensor`` draws it, so a batch equals single-seed runs and the official code's noise."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = (1, self.unet.config.in_channels, self.plan.height // 8, self.plan.width // 8)
        on_gpu = self.plan.generator_device == "cuda"
        where = self.device if on_gpu and self.device.type == "cuda" else torch.device(self.plan.generator_device)
        noise = [
            randn_tensor(shape, generator=torch.Generator(where).manual_seed(s), device=where, dtype=self.dtype)
            for s in self.plan.seeds
        ]
        return torch.cat(noise).to(self.device) * self.scheduler.init_noise_sigma

    def denoise(self, z: torch.Tensor, i: int, t) -> torch.Tensor:
        """CFG noise prediction on the (updated) latent, then the scheduler step; the recorder
        watches the conditional rows of this forward at recorded steps."""
        n = len(z)
        sinks = self.recorder.sinks(i) if self.recorder else {}
        x = self.scheduler.scale_model_input(torch.cat([z, z]) if self.cfg else z, t)
        eps, probs = self.predict(x, t, self.conditioning.unet_kwargs(n, cfg=self.cfg), list(sinks))
        for name, p in probs.items():  # in the order the layers ran
            sinks[name](name, p)
        if self.cfg:
            uncond, cond = eps.chunk(2)
            eps = uncond + self.plan.guidance_scale * (cond - uncond)
        if sinks:
            self.recorder.end_step(i, t)
        z = self.scheduler.step(eps, self.host_timesteps[i], z).prev_sample
        broken = ~torch.isfinite(z).flatten(1).all(dim=1)  # noted on the device; read once, at the end
        self.broken_at = torch.where(broken & (self.broken_at < 0), i, self.broken_at)
        return z

    def check_finite(self) -> None:
        """A latent that became NaN/inf would decode to black or noise: say which seeds and where. Warn
        once if some guided step had a non-finite gradient (those samples were not moved there)."""
        if self.broken_at.device.type == "meta":  # shapes only: there are no values to check
            return
        steps = int(self.nonfinite_steps)
        if steps:
            warnings.warn(
                f"non-finite A&E gradient at {steps} guided step(s): the affected samples were not moved there "
                "(see trace.nonfinite)",
                stacklevel=3,
            )
        first = self.broken_at.tolist()
        if any(k >= 0 for k in first):
            seeds = [s for s, k in zip(self.plan.seeds, first) if k >= 0]
            i = min(k for k in first if k >= 0)
            raise AnelabError(
                f"the latent of seed(s) {seeds} became NaN/inf (first at loop index {i}, t={self.plan.timesteps[i]}), e.g. an fp16 "
                "overflow; run in float32 (dtype=torch.float32) or with a smaller scale_factor"
            )

    def predict(self, x: torch.Tensor, t, unet_kwargs: dict, read: list[str]) -> tuple[torch.Tensor, dict]:
        """The UNet's noise prediction and the attention probabilities of the ``read`` layers in the
        conditional rows (the recorder's), each layer's output staying its own processor's; on the fast
        path replayed from a CUDA graph (one for unrecorded steps, one for recorded ones)."""
        rows = slice(len(x) // 2, len(x)) if self.cfg else slice(0, len(x))
        hooks, unet = self.hooks, self.unet

        def forward(static):
            probs = {}
            with hooks.reading({name: probs.__setitem__ for name in read}, observe=rows):
                eps = unet(static["x"], static["t"], **fast_path.nested(static, skip=("x", "t"))).sample
            return {"eps": eps} | {f"probs:{name}": p for name, p in probs.items()}

        inputs = {"x": x, "t": torch.as_tensor(t, device=x.device), **fast_path.flat(unet_kwargs)}
        graph = None
        if self.graphs is not None:
            key = (tuple(read), rows.start, rows.stop) if read else None
            graph = self.graphs.get("CFG forward", key, forward, inputs, self.capture)
        out = forward(inputs) if graph is None else graph(inputs)
        return out.pop("eps"), {k.removeprefix("probs:"): v for k, v in out.items()}

    # -- Attend-and-Excite ---------------------------------------------------------------------
    def measure(self, z: torch.Tensor, t) -> _Measure:
        """A&E's measurement at ``z`` (:class:`_Measurer`); on the fast path replayed, with its gradient,
        from a CUDA graph of the run's batch (refinement's subsets and the two-stage layout run eagerly)."""
        unet_kwargs = self.conditioning.unet_kwargs(len(z), cfg=False)
        two_stage = self.plan.layout and self.config.layout_update == "two_stage"  # two gradients of one forward
        if self.graphs is None or two_stage or len(z) != len(self.plan.seeds):
            return self.measurer(z, t, unet_kwargs, self.layout_targets)
        inputs = {"z": z, "t": torch.as_tensor(t, device=z.device), **fast_path.flat(unet_kwargs)}
        if self.layout_targets is not None:
            inputs["layout_targets"] = self.layout_targets
        graph = self.graphs.get("guided step", self.measurer.key(), self.measurer.graphable, inputs, self.capture)
        if graph is None:
            return self.measurer(z, t, unet_kwargs, self.layout_targets)
        return _Measure.from_outputs(graph(inputs))

    def layout_step(self, z: torch.Tensor, t, alpha: float, at: _Measure | None) -> torch.Tensor:
        """The original study's first stage (§0x7): δ = −α·layout_scale·∇KL(A ‖ N(G, σ²)), taken at ``z``
        (``at``: a measurement of ``z`` whose graph is alive, else a new one). Returns ``z + δ``."""
        at = at if at is not None and at.leaf is not None else self.measure(z, t)
        with torch.enable_grad():
            grad = torch.autograd.grad(self.config.layout_scale * at.kl.sum(), at.leaf, retain_graph=True)[0]
        finite = torch.isfinite(grad).flatten(1).all(dim=1)
        self.nonfinite |= ~finite
        return z - alpha * torch.where(finite[:, None, None, None], grad, torch.zeros_like(grad))

    def guide(self, z: torch.Tensor, i: int, t) -> torch.Tensor:
        """A&E at loop index ``i``: measure, refine at a threshold step, one regular update (§1.7)."""
        alpha = float(self.plan.step_sizes[i])
        regular = i < self.last_update
        first = end = self.measure(z, t)
        self.nonfinite = torch.zeros(len(z), dtype=torch.bool, device=z.device)
        triggered = torch.zeros(len(z), dtype=torch.bool, device=z.device)
        iterations = torch.zeros(len(z), dtype=torch.long, device=z.device)
        reached = torch.zeros(len(z), dtype=torch.bool, device=z.device)  # read only at threshold steps
        threshold = self.config.thresholds.get(i)
        if threshold is not None:
            z, end, triggered, iterations = self.refine(z, t, first, threshold, alpha, need_final_grad=regular)
            reached = ~end.violates(threshold, self.config.suppress_bound)
        updated = iterations > 0
        if regular and self.config.layout_update == "two_stage" and self.plan.layout:
            z = self.layout_step(z, t, alpha, end)  # stage 1; stage 2 is the A&E update below, measured at z + δ
            end = self.measure(z, t)
            updated = torch.ones_like(updated)
        if regular:
            move = end.objective != 0  # no update when the loss is exactly 0 (§1.5)
            if end.grad is not None or move.any():  # a replayed graph brings the gradient: no need to ask the GPU
                grad = self.gradient(end)
                move = move & ~self.nonfinite
                z = torch.where(move[:, None, None, None], z - alpha * grad, z)
            updated = updated | move
        self.nonfinite_steps += self.nonfinite.any()
        self.log(
            step=i,
            timestep=self.plan.timesteps[i],  # t itself is on the device: int(t) would wait for the GPU
            step_size=alpha,
            threshold=np.nan if threshold is None else threshold,
            first=first,
            end=end,
            triggered=triggered,
            iterations=iterations,
            reached=reached,
            updated=updated,
        )
        return z.detach()

    def refine(self, z, t, first: _Measure, threshold: float, alpha: float, need_final_grad: bool):
        """Iterative refinement (§1.8) for the samples that violate the threshold (loss above
        ``1 − threshold``; with suppression also a suppressed token above ``max(bound, 1 − threshold)``).

        Official exit rule, per sample: iteration k measures at the current latent, steps if the
        objective ≠ 0, and the loop goes on while that measurement (taken *before* the step) violates
        the threshold and k < ``max_refinement_steps``; then one re-measure at the final latent, whose
        gradient the regular update uses. Iteration 1 re-uses the step's first measurement (same
        latent, same result), and one batched forward serves as the next iteration of the samples
        going on and the re-measure of those that stop.
        """
        bound = self.config.suppress_bound
        triggered = first.violates(threshold, bound)
        iterations = torch.zeros(len(z), dtype=torch.long, device=z.device)
        if not triggered.any() or self.config.max_refinement_steps == 0:
            return z, first, triggered, iterations
        grad_first = self.gradient(first)
        end = first.detached(grad_first.clone() if need_final_grad else None)
        z = z.clone()
        active = triggered.nonzero()[:, 0]
        objective_k, violates_k, grad_k = first.objective[active], triggered[active], grad_first[active]
        while active.numel():
            iterations[active] += 1
            moving = objective_k != 0
            z[active[moving]] -= alpha * grad_k[moving]
            going_on = violates_k & (iterations[active] < self.config.max_refinement_steps)
            again = self.measure(z[active], t)  # next iteration's forward, or the final re-measure
            if going_on.any() or end.grad is not None:
                self.gradient(again, active)
            end.put(active[~going_on], again, ~going_on)
            active = active[going_on]
            objective_k, violates_k = again.objective[going_on], again.violates(threshold, bound)[going_on]
            grad_k = again.grad[going_on] if again.grad is not None else None
        return z, end, triggered, iterations

    def gradient(self, measure: _Measure, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``measure.gradient()``, noting the samples (batch ``rows``) whose gradient was not finite."""
        grad = measure.gradient()
        if measure.nonfinite is not None:  # None: a copy whose gradient was noted where it was computed
            if rows is None:
                self.nonfinite |= measure.nonfinite
            else:
                self.nonfinite[rows] |= measure.nonfinite  # on the device (rows is a device tensor): no host sync
        return grad

    def log(
        self,
        *,
        step,
        timestep,
        step_size,
        threshold,
        first: _Measure,
        end: _Measure,
        triggered,
        iterations,
        reached,
        updated,
    ) -> None:
        """One guided step's trace rows (kept on the device until the run ends)."""
        suppressed = None if first.suppressed is None else suppress_loss(first.suppressed, self.config.suppress_bound)
        self.traces.add(
            step=step,
            timestep=timestep,
            step_size=step_size,
            threshold=threshold,
            tensors=dict(
                max_attention=first.m,
                loss=first.loss,
                suppress_loss=suppressed,
                layout_kl=first.kl,
                objective=first.objective,
                triggered=triggered,
                refinement_iterations=iterations,
                reached=reached,
                updated=updated,
                final_max_attention=end.m,
                final_loss=end.loss,
                final_objective=end.objective,
                nonfinite=self.nonfinite,
            ),
        )


# -- preparation ---------------------------------------------------------------------------------
def plan_run(
    pipe,
    prompt: str,
    *,
    tokens=(),
    seeds=(0,),
    config: GuidanceConfig | None = None,
    suppress=(),
    layout=None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    output_type: str = "pil",
    record: Record | None = None,
    generator_device: str = "cpu",
    fast: bool | None = None,
    low_memory: bool | None = None,
) -> RunPlan:
    """Check every argument of :func:`generate` against ``pipe`` and decide the run, before any
    denoising (each failure is one clear :class:`AnelabError`). The one pre-flight check: the study
    runner calls it for every (variant, prompt) before making any image."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise AnelabError(f"prompt must be a non-empty string, got {prompt!r}")
    seeds = require_seeds(seeds)
    steps = num_inference_steps
    if not is_int(steps) or steps < 1:
        raise AnelabError(f"num_inference_steps must be an int >= 1, got {steps!r}")
    guidance_scale = require_number("guidance_scale", guidance_scale)
    if output_type not in OUTPUT_TYPES:
        raise AnelabError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if generator_device not in GENERATOR_DEVICES:
        raise AnelabError(f"generator_device must be one of {GENERATOR_DEVICES}, got {generator_device!r}")
    if generator_device == "cuda" and not torch.cuda.is_available():
        raise AnelabError(
            "generator_device='cuda' draws the noise with torch.Generator('cuda') as the official code does; torch sees no GPU here"
        )
    if fast and not fast_path.available(pipe.unet.device):
        raise AnelabError(
            f"fast=True replays CUDA graphs and needs the pipeline on a CUDA GPU; it is on {pipe.unet.device} (leave fast=None)"
        )
    low_memory = memory.requested(low_memory)
    if config is not None and not isinstance(config, GuidanceConfig):
        raise AnelabError(f"config must be a GuidanceConfig or None (plain SD), got {type(config).__name__}")
    scale = getattr(pipe, "vae_scale_factor", 8)
    height = height or pipe.unet.config.sample_size * scale
    width = width or pipe.unet.config.sample_size * scale
    for name, value in (("height", height), ("width", width)):
        if not is_int(value) or value < scale or value % scale:
            raise AnelabError(f"{name} must be a positive multiple of {scale}, got {value!r}")
    token_indices = resolve_tokens(pipe.tokenizer, prompt, tokens)
    models.check_tokenizers(pipe, prompt)
    suppress_indices, targets = _suppress_and_layout(pipe.tokenizer, prompt, token_indices, suppress, layout, config)
    measured = token_indices + suppress_indices + [i for i in targets if i not in token_indices + suppress_indices]
    roles = ["excite"] * len(token_indices) + ["suppress"] * len(suppress_indices)
    roles += ["layout"] * (len(measured) - len(roles))
    words = [prompt_tokens(pipe.tokenizer, prompt)[i] for i in measured]
    layers = hk.cross_attention_layers(pipe.unet, height // scale, width // scale)
    timesteps = schedule(pipe, steps)
    guidance_layers: list[hk.Layer] = []
    step_sizes = np.zeros(len(timesteps))
    layout_targets = None
    if config is not None:
        if not measured:
            raise AnelabError(
                "guidance needs subject tokens (tokens=[...]), suppress=[...] or layout={...}; use config=None for plain SD"
            )
        guidance_layers = hk.layers_at(layers, config.attention_res)
        if not guidance_layers:
            available = sorted({layer.res for layer in layers}, reverse=True)
            raise AnelabError(
                f"attention_res {config.attention_res} does not exist at {height}x{width}: this model has "
                f"cross-attention at resolutions {available}"
            )
        h, w = guidance_layers[0].shape
        if config.smooth and config.kernel_size // 2 >= min(h, w):
            raise AnelabError(
                f"kernel_size {config.kernel_size} is too large for {h}x{w} attention maps (at most {2 * min(h, w) - 1})"
            )
        config.check_schedule(len(timesteps))
        step_sizes = config.step_sizes(len(timesteps))
        if targets:
            layout_targets = torch.stack([gaussian_target(p, (h, w), config.layout_sigma) for p in targets.values()])
    eot = eot_index(pipe.tokenizer, prompt)
    normaliser = (
        config or GuidanceConfig()
    )  # its token columns as this model reads them (§1.3): the loss, the trace and the recording
    columns = models.softmax_tokens(pipe, normaliser.softmax_tokens)
    if columns != normaliser.softmax_tokens:
        normaliser = normaliser.replace(softmax_tokens=columns)
    if record is not None:
        record = plan_record(
            record,
            pipe=pipe,
            prompt=prompt,
            subjects=measured,
            eot=eot,
            seeds=seeds,
            timesteps=timesteps,
            layers=layers,
            config=normaliser,
            height=height,
            width=width,
        )
    return RunPlan(
        prompt=prompt,
        token_indices=token_indices,
        suppress_indices=suppress_indices,
        layout=targets,
        measured=measured,
        roles=roles,
        token_words=words,
        layout_targets=layout_targets,
        eot=eot,
        seeds=seeds,
        config=config,
        guidance_scale=guidance_scale,
        height=int(height),
        width=int(width),
        timesteps=timesteps,
        step_sizes=step_sizes,
        guidance_layers=guidance_layers,
        normaliser=normaliser,
        record=record,
        generator_device=generator_device,
        fast=fast_path.available(pipe.unet.device) if fast is None else bool(fast),
        low_memory=low_memory,
    )


def schedule(pipe, num_inference_steps: int) -> list[int]:
    """The scheduler's timesteps for ``num_inference_steps`` (one per loop index; PNDM 50 steps → 51)."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(int(num_inference_steps))
    return [int(t) for t in scheduler.timesteps]


def _suppress_and_layout(tokenizer, prompt, excited, suppress, layout, config):
    """Positions to suppress and layout targets ``{position: (x, y)}``, checked (STUDIES.md 05)."""
    suppress_indices = resolve_tokens(tokenizer, prompt, suppress)
    both = sorted(set(excited) & set(suppress_indices))
    if both:
        names = [prompt_tokens(tokenizer, prompt)[i] for i in both]
        raise AnelabError(
            f"token(s) {names} are both excited (tokens=) and suppressed (suppress=); a token can only be one"
        )
    if layout is None:
        layout = {}
    if not isinstance(layout, Mapping):
        raise AnelabError(f"layout must be a dict {{token: (x, y)}} with x, y in [0, 1], got {layout!r}")
    targets = {}
    for token, point in layout.items():
        position = resolve_tokens(tokenizer, prompt, [token])[0]
        targets[position] = layout_point(token, point)
        if position in suppress_indices:
            raise AnelabError(
                f"layout token {token!r} is also suppressed; a suppressed token cannot have a layout target"
            )
    if (suppress_indices or targets) and config is None:
        raise AnelabError("suppress= and layout= need a GuidanceConfig (config=None is plain Stable Diffusion)")
    return suppress_indices, targets


def layout_point(token, point) -> tuple[float, float]:
    """A layout target ``(x, y)`` with 0 <= x, y <= 1 (x right, y down), or a one-line error (the one check of a point)."""
    ok = isinstance(point, (tuple, list)) and len(point) == 2 and all(is_number(v) and 0 <= v <= 1 for v in point)
    if not ok:
        raise AnelabError(
            f"layout point for {token!r} must be (x, y) with 0 <= x, y <= 1 (x right, y down), got {point!r}"
        )
    return float(point[0]), float(point[1])


class _frozen:
    """Context: no parameter of ``module`` requires grad (restored afterwards)."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.flags = [(p, p.requires_grad) for p in self.module.parameters()]
        self.module.requires_grad_(False)

    def __exit__(self, *exc):
        for p, flag in self.flags:
            p.requires_grad_(flag)


def _decode(pipe, latents: torch.Tensor, output_type: str):
    """The VAE decode of the model's own pipeline (with the latents mean/std when the VAE config has them)."""
    vae = pipe.vae
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        latents = latents * torch.tensor(std).view(1, -1, 1, 1).to(latents) / vae.config.scaling_factor + torch.tensor(
            mean
        ).view(1, -1, 1, 1).to(latents)
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)
