"""`generate`: Stable Diffusion with attention guidance — Attend-and-Excite or any method of :mod:`anelab.methods` —
batched over seeds.

Reading order: :func:`generate` gathers its arguments into one :class:`Request`, :func:`plan_run` checks it
against the pipeline into a :class:`RunPlan`, then :meth:`_Sampler.run` is the denoising loop. The sampler
knows a method only through its protocol (:mod:`anelab.methods.base`); each loop iteration ``i`` does:

1. :meth:`_Sampler.guide` — only on iterations where the method can change the latent
   (:meth:`~anelab.methods.base.Method.guided`: a regular update or a refinement step):
   a. :meth:`_Sampler.measure` (:class:`anelab.measure.Measurer`): conditional-only UNet forward at the
      current latent (no CFG), stopped after the last layer the method reads; the method's terms;
   b. at a refinement step, :meth:`_Sampler.refine` for the samples that violate its threshold (§1.8);
   c. one regular step ``z ← z − α_i ∇L`` where the method updates at ``i`` (skipped where L = 0).
2. :meth:`_Sampler.denoise` — the usual CFG prediction on the *updated* latent and the scheduler step.

A method that acts on the initial noise (InitNO) does so before step 0 (``optimise_noise``). Guidance works on
the latent as the UNet sees it, ``scheduler.scale_model_input(z)``: the identity for the PNDM and DDIM
schedulers of SD 1.x and 2.x (so this is the official code's update, §1.6), ``z/√(σ²+1)`` for SDXL's Euler,
whose step ``α_i`` then acts on the UNet's input as it does on SD 1.x. What the UNet takes besides latent and
timestep comes from :class:`anelab.models.Conditioning`.

Every seed in the batch carries its own refinement state; seed ``s`` starts from the noise of
``torch.Generator(generator_device).manual_seed(s)`` exactly as a single-seed run does. The trace of each
guided step stays on the device (:class:`anelab.trace.TraceLog`) and the NaN check of the latents is read once
at the end: no host synchronisation per step beyond the refinement decisions. On CUDA the CFG forward and the
measurement with its gradient are replayed from CUDA graphs (:mod:`anelab.fast`); ``low_memory`` recomputes
the measurement's unread blocks in its backward (:mod:`anelab.memory`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm  # text bars everywhere: a notebook widget bar leaves "model not found" in saved notebooks

from . import fast as fast_path
from . import hooks as hk
from . import memory, methods, mmdit, models
from . import unet as unet_family
from .cache import AttentionCache
from .checks import is_int, require_number, require_seeds
from .errors import AnelabError
from .log import bars_off, logger
from .measure import Measure, Measurer, map_tensors, put_rows
from .methods.base import Method, TokenSoftmax
from .objectives import gaussian_target
from .recording import Record, Recorder, RecordPlan, plan_record
from .subjects import Subject, SubjectPositions, gather, layout_point, resolve
from .tokens import eot_index, prompt_tokens
from .trace import TRACE_COLUMNS, TraceLog

__all__ = ["GuidedOutput", "Request", "RunPlan", "TRACE_COLUMNS", "generate", "layout_point", "plan_run", "sample"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
GENERATOR_DEVICES = ("cpu", "cuda")  # where each seed's initial noise is drawn (the official code: "cuda")


@dataclasses.dataclass
class GuidedOutput:
    """What :func:`generate` returns. ``images`` is None for ``output_type="latent"``."""

    images: list | np.ndarray | torch.Tensor | None
    latents: torch.Tensor  # [n_seeds, 4, h/8, w/8], final
    trace: pd.DataFrame  # one row per (seed, guided step, token), columns TRACE_COLUMNS (+ the method's terms)
    attention: AttentionCache | None = None  # when record= was given
    seeds: list[int] = dataclasses.field(default_factory=list)
    prompt: str = ""
    token_indices: list[int] = dataclasses.field(default_factory=list)
    timesteps: list[int] = dataclasses.field(default_factory=list)
    seconds: float = 0.0  # wall time of sampling + decoding, all seeds
    method: str | None = None  # the method's name (None: plain SD)
    noise: pd.DataFrame | None = None  # a method's initial-noise optimisation, one row per seed (InitNO)

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / max(len(self.seeds), 1)


@dataclasses.dataclass(frozen=True)
class Request:
    """One :func:`generate` call's arguments as a single value: what the study runner builds per block and
    :func:`plan_run` checks. ``method`` None is plain Stable Diffusion."""

    prompt: str
    subjects: tuple[Subject, ...] = ()
    seeds: tuple[int, ...] = (0,)
    method: Method | None = None
    num_inference_steps: int | None = None  # None: the family's own pipeline's (models.DEFAULTS)
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    output_type: str = "pil"
    record: Record | None = None
    generator_device: str = "cpu"
    fast: bool | None = None
    low_memory: bool | None = None
    progress: bool = True
    callback_on_step_end: Callable | None = None  # diffusers' convention (see generate); not part of any identity
    callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",)
    # SD 3 / FLUX only (anelab.mmdit): which blocks are read, how a word's text keys combine, the text softmax,
    # the step-size rule on the flow-matching latent, the T5 length (None: the pipeline's)
    blocks: tuple | None = None
    token_maps: str | None = None
    text_softmax: str = "text"
    flow_step: str = "index"
    thresholds: str = "index"
    max_sequence_length: int | None = None

    @classmethod
    def of(
        cls,
        prompt: str,
        tokens: Sequence[str | int] = (),
        seeds: Sequence[int] = (0,),
        config: Method | None = None,
        *,
        subjects=None,
        method=None,
        suppress=(),
        layout: Mapping | None = None,
        **options,
    ) -> "Request":
        """A request from :func:`generate`'s arguments: ``tokens``/``subjects``/``suppress``/``layout`` become one
        subjects value, ``config``/``method`` one method (:func:`anelab.methods.resolve`)."""
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise AnelabError(f"generate() got unknown argument(s) {unknown}")
        items = gather(tokens=tokens, subjects=subjects, suppress=suppress, layout=layout)
        chosen = methods.resolve(method, config)
        if chosen is None and any(s.role != "excite" or s.target is not None for s in items):
            raise AnelabError("suppress= and layout= need a GuidanceConfig (config=None is plain Stable Diffusion)")
        return cls(prompt=prompt, subjects=items, seeds=tuple(require_seeds(seeds)), method=chosen, **options)


@dataclasses.dataclass
class RunPlan:
    """Everything :func:`plan_run` decided before denoising starts."""

    request: Request
    prompt: str
    subjects: SubjectPositions  # resolved
    words: dict[int, str]  # the prompt's tokens by position (<eot> included)
    token_indices: list[int]  # excited nouns
    measured: list[int]  # the trace's token columns (the method's choice: A&E excited, suppressed, layout-only)
    roles: list[str]  # per measured position
    token_words: list[str]  # per measured position
    layout_targets: torch.Tensor | None  # [L, h, w] target densities on the guidance grid, layout order
    eot: int
    seeds: list[int]
    method: Method | None  # as requested (its settings are the store identity)
    active: Method | None  # the method as it computes on this model (softmax columns resolved)
    guidance_scale: float
    height: int
    width: int
    timesteps: list[int]
    step_sizes: np.ndarray
    read_layers: dict[tuple[str, int], list[hk.Layer]]  # ("cross"|"self", res) -> layers, execution order
    stop_layer: str | None  # the last layer a measurement reads
    columns: str  # what softmax_tokens="legacy" means on this model (models.softmax_tokens)
    normaliser: TokenSoftmax  # the token maps of the trace's max_attention and of the recording
    record: RecordPlan | None  # what to record of the CFG forward
    generator_device: str = "cpu"
    fast: bool = False  # CUDA graphs for the CFG forward and the guided step (anelab.fast)
    low_memory: bool = False  # checkpoint the guided forward's unread blocks (anelab.memory)
    num_inference_steps: int = 50  # as given, or the family's default
    family: str = "sd1"
    reading: mmdit.Reading | None = None  # SD 3 / FLUX: how the read blocks' maps are made
    t5_length: int = 0  # SD 3 / FLUX: the T5 positions the text has

    @property
    def transformer(self) -> bool:
        """SD 3 or FLUX (:mod:`anelab.mmdit`)."""
        return self.family in mmdit.FAMILIES

    def named_subjects(self) -> tuple[Subject, ...]:
        """The subjects in the prompt's own words (what the store identity of ``anelab generate`` names)."""
        return tuple(
            Subject(self.words[s.noun], tuple(self.words[m] for m in s.modifiers), s.role, s.target)
            for s in self.subjects
        )

    @property
    def config(self) -> Method | None:
        """The method's settings (``GuidanceConfig`` for A&E): the name earlier code knows."""
        return self.method

    @property
    def guidance_layers(self) -> list[hk.Layer]:
        """The layers of the method's main cross-attention resolution."""
        if self.active is None:
            return []
        return self.read_layers[("cross", self.active.reads().cross[0])]


def generate(
    pipe,
    prompt: str,
    tokens: Sequence[str | int] = (),
    seeds: Sequence[int] = (0,),
    config: Method | None = None,
    *,
    subjects=None,
    method=None,
    suppress: Sequence[str | int] = (),
    layout: Mapping[str | int, tuple[float, float]] | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    output_type: str = "pil",
    record: Record | None = None,
    generator_device: str = "cpu",
    fast: bool | None = None,
    low_memory: bool | None = None,
    progress: bool = True,
    callback_on_step_end: Callable | None = None,
    callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    blocks=None,
    token_maps: str | None = None,
    text_softmax: str = "text",
    flow_step: str = "index",
    thresholds: str = "index",
    max_sequence_length: int | None = None,
) -> GuidedOutput:
    """Sample ``prompt`` for every seed at once; guided on ``tokens`` (or ``subjects``) unless no method is given.

    ``tokens`` are words of the prompt or CLIP positions (``<sot>`` = 0); ``subjects=[("apple", ["red"]), "bowl"]``
    names nouns with their modifiers (what binding methods read; :mod:`anelab.subjects`). ``config`` is a
    method's settings — a :class:`GuidanceConfig` is Attend-and-Excite — and ``method="syngen"`` (or
    ``anelab.methods.get("syngen", ...)``) picks another method of :func:`anelab.methods.names`; neither is plain
    Stable Diffusion with the same seeds. ``suppress=["dog"]`` pushes those tokens' attention down;
    ``layout={"cat": (x, y)}`` pulls a token's attention towards a point (x right, y down, in [0, 1]) (both A&E).
    ``record=Record(...)`` keeps cross-attention maps and token statistics of the CFG forward in
    ``out.attention``. ``generator_device="cuda"`` draws each seed's noise with ``torch.Generator("cuda")`` as
    the official code does; the default CPU generator gives the same noise on every machine. ``fast`` (default:
    on CUDA) replays the CFG forward and the measurement with its gradient from CUDA graphs (:mod:`anelab.fast`;
    same results). ``low_memory=True`` holds about a quarter of the activations for the guided backward and
    recomputes the rest (:mod:`anelab.memory`; None: ``$ANELAB_LOW_MEMORY``).

    ``callback_on_step_end(pipe, i, t, callback_kwargs)`` is called after every scheduler step, as diffusers'
    pipelines call it: ``callback_kwargs`` holds the names of ``callback_on_step_end_tensor_inputs``
    (:data:`CALLBACK_TENSOR_INPUTS`: ``latents`` [n_seeds, C, h, w]; ``prompt_embeds`` / ``negative_prompt_embeds``
    [1, 77, D]), and a tensor in the dict it returns replaces that one for the steps after (a diffusers
    ``PipelineCallback`` brings its own ``tensor_inputs``). See the module docstring.

    ``num_inference_steps`` and ``guidance_scale`` default to the model family's own pipeline's (SD 1.x/2.x 50 and
    7.5, SDXL 50 and 5.0, SD 3 28 and 7.0, FLUX 28 and 3.5: FLUX's is its guidance embedding, there is no CFG batch).
    On SD 3 and FLUX (:mod:`anelab.mmdit`) ``blocks`` chooses the joint-attention blocks read (indices, ``"a-b"``
    ranges, names; default SD 3 all, FLUX the double-stream ones), ``token_maps`` how a word's CLIP and T5 keys
    combine (``"clip"``, ``"t5"``, ``"mean"``), ``text_softmax`` the map's softmax (``"text"`` keys only, or the
    ``"joint"`` softmax's text columns), ``flow_step`` the step size on the flow-matching latent (``"index"``: A&E's
    α_i unchanged; ``"snr"``: α_i·((1−σ)²+σ²), the same step relative to the signal as on SD 1.x, reference §2),
    ``thresholds`` where the method's loop-index settings land (``"index"``: as given; ``"sigma"``: read as SD 1.x's
    50-step indices and placed at the step of equal noise level, :func:`anelab.mmdit.sigma_placement`),
    ``max_sequence_length`` the T5 length (the pipeline's default).
    """
    request = Request.of(
        prompt,
        tokens,
        seeds,
        config,
        subjects=subjects,
        method=method,
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
        progress=progress,
        callback_on_step_end=callback_on_step_end,
        callback_on_step_end_tensor_inputs=tuple(callback_on_step_end_tensor_inputs),
        blocks=None if blocks is None else tuple([blocks] if isinstance(blocks, (int, str)) else blocks),
        token_maps=token_maps,
        text_softmax=text_softmax,
        flow_step=flow_step,
        thresholds=thresholds,
        max_sequence_length=max_sequence_length,
    )
    return sample(pipe, request)


def sample(pipe, request: Request) -> GuidedOutput:
    """Run one :class:`Request` (what :func:`generate` and the study runner call)."""
    plan = plan_run(pipe, request)
    recorder = Recorder(plan.record, plan.prompt, plan.seeds) if plan.record else None
    read = [layer for layers in plan.read_layers.values() for layer in layers]
    hooked = read + (plan.record.layers if plan.record else [])
    net = denoiser(pipe)
    graphs = fast_path.graph_cache(net) if plan.fast else None  # before the capture processors go in
    processor = hk.CaptureProcessor
    if plan.reading is not None:
        processor = lambda name, hooks, fallback: mmdit.JointCapture(name, hooks, fallback, plan.reading)  # noqa: E731
    start = time.perf_counter()
    with (
        torch.no_grad(),
        _frozen(net),
        hk.attention_capture(net, hooked, processor) as hooks,
        memory.checkpointed(getattr(net, "transformer", net), [layer.name for layer in read])
        if plan.low_memory
        else contextlib.nullcontext(),
    ):
        sampler = _Sampler(pipe, plan, hooks, recorder, graphs)
        latents = sampler.run(plan.num_inference_steps, request.progress)
        images = None if request.output_type == "latent" else _decode(pipe, latents, request.output_type)
    seconds = time.perf_counter() - start
    logger.debug(
        "%s: %r, %d seed(s), %d steps, %dx%d px%s%s: %.2f s",
        "SD" if plan.method is None else plan.method.label,
        plan.prompt,
        len(plan.seeds),
        plan.num_inference_steps,
        plan.height,
        plan.width,
        " (CUDA graphs)" if plan.fast else "",
        " (low memory)" if plan.low_memory else "",
        seconds,
    )
    attention = None
    if recorder:
        meta = {
            "config": None if plan.method is None else plan.method.to_dict(),
            "record": request.record.to_dict(),
            "guidance_scale": plan.guidance_scale,
            "height": plan.height,
            "width": plan.width,
            "num_inference_steps": int(plan.num_inference_steps),
            "eot": plan.eot,
            "subjects": [[s.noun, list(s.modifiers)] for s in plan.subjects if s.role == "excite"],
        } | ({"method": plan.method.name} if plan.method is not None and plan.method.name != methods.AE else {})
        attention = recorder.cache(meta)
    return GuidedOutput(
        images=images,
        latents=latents,
        trace=sampler.traces.frame(),
        attention=attention,
        seeds=plan.seeds,
        prompt=plan.prompt,
        token_indices=plan.token_indices,
        timesteps=plan.timesteps,
        seconds=seconds,
        method=None if plan.method is None else plan.method.name,
        noise=sampler.noise,
    )


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
        self.pipe, self.plan, self.hooks, self.unet, self.recorder = pipe, plan, hooks, denoiser(pipe), recorder
        self.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # stateful: own copy
        self.device, self.dtype = self.unet.device, self.unet.dtype
        self.cfg = plan.guidance_scale > 1.0 and plan.family != "flux"  # FLUX: a guidance embedding, no CFG batch
        encode = dict(height=plan.height, width=plan.width, cfg=self.cfg, device=self.device, dtype=self.dtype)
        if plan.transformer:
            extra = dict(guidance_scale=plan.guidance_scale, t5_length=plan.t5_length)
            self.conditioning = mmdit.JointConditioning.encode(pipe, plan.prompt, **encode, **extra)
        else:
            self.conditioning = models.Conditioning.encode(pipe, plan.prompt, **encode)
        self.method = plan.active
        self.traces = TraceLog(
            seeds=plan.seeds, measured=plan.measured, roles=plan.roles, words=plan.token_words, method=plan.active
        )
        self.broken_at = None  # per sample: first loop index whose latent was not finite (-1: none)
        self.nonfinite_steps = torch.zeros((), dtype=torch.long, device=self.device)  # guided steps with a NaN gradient
        self.measurer = Measurer(self.unet, hooks, plan) if plan.active else None
        self.layout_targets = None if plan.layout_targets is None else plan.layout_targets.to(self.device)
        self.graphs = graphs  # the fast path's CUDA graphs (None: eager)
        self.capture = self.device.type == "cuda"  # elsewhere StaticGraph runs its function (the tests' stand-in)
        self.state = None  # what the method carries from one measurement to the next (terms["state"])
        self.noise = None  # the method's initial-noise report

    # -- the loop -----------------------------------------------------------------------------
    def run(self, num_inference_steps: int, progress: bool) -> torch.Tensor:
        set_timesteps(
            self.pipe, self.scheduler, num_inference_steps, self.plan, self.device
        )  # first: Euler's init_noise_sigma depends on it
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        z = self.initial_latents()
        steps = self.scheduler.timesteps
        self.host_timesteps = (
            steps if steps.is_meta else steps.cpu()
        )  # what the scheduler's step reads: no GPU round trip
        self.broken_at = torch.full((len(z),), -1, dtype=torch.long, device=z.device)
        n = len(self.plan.timesteps)
        if self.method is not None and hasattr(self.method, "optimise_noise"):
            z, self.noise = self.method.optimise_noise(_NoiseContext(self, z))
        label = "SD" if self.method is None else self.method.label
        for i, t in enumerate(tqdm(self.scheduler.timesteps, desc=label, disable=bars_off(progress), leave=False)):
            if self.method is not None and self.method.guided(i, n):
                scale = input_scale(self.scheduler, t)  # the UNet's input is z * scale
                z = self.guide(z, i, t) if scale == 1.0 else self.guide(z * scale, i, t) / scale
            z = self.denoise(z, i, t)
            if self.plan.request.callback_on_step_end is not None:
                z = self.call_back(z, i, t)
        self.check_finite()
        return z

    def call_back(self, z: torch.Tensor, i: int, t) -> torch.Tensor:
        """The caller's ``callback_on_step_end`` after step ``i``, as diffusers calls it; what it returns replaces
        the latents or the text embeddings (checked: same shape, finite dtype of the run)."""
        request, conditioning = self.plan.request, self.conditioning
        given = {"latents": z, "prompt_embeds": conditioning.cond, "negative_prompt_embeds": conditioning.uncond}
        names = callback_inputs(request)
        returned = request.callback_on_step_end(self.pipe, i, t, {k: given[k] for k in names})
        if returned is None:
            return z
        if not isinstance(returned, Mapping):
            raise AnelabError(
                f"callback_on_step_end must return a dict of tensors (or None), got {type(returned).__name__}"
            )
        for name, value in returned.items():
            if name not in given:
                raise AnelabError(
                    f"callback_on_step_end returned {name!r}; it may return {list(CALLBACK_TENSOR_INPUTS)}"
                )
            old = given[name]
            if old is None or not isinstance(value, torch.Tensor) or value.shape != old.shape:
                wanted = "nothing (no CFG here)" if old is None else f"a tensor of shape {list(old.shape)}"
                raise AnelabError(f"callback_on_step_end returned {name!r} as {_shape_of(value)}; expected {wanted}")
            given[name] = value.to(old.device, old.dtype)
        self.conditioning = dataclasses.replace(
            conditioning, cond=given["prompt_embeds"], uncond=given["negative_prompt_embeds"]
        )
        return given["latents"]

    def initial_latents(self) -> torch.Tensor:
        """Each seed's noise from its own generator on ``plan.generator_device``, drawn as diffusers'
        ``randn_tensor`` draws it, so a batch equals single-seed runs and the official code's noise."""
        self.generators = [torch.Generator(self._noise_device()).manual_seed(s) for s in self.plan.seeds]
        return self.draw_noise(self.generators)

    def _noise_device(self) -> torch.device:
        on_gpu = self.plan.generator_device == "cuda"
        return self.device if on_gpu and self.device.type == "cuda" else torch.device(self.plan.generator_device)

    def draw_noise(self, generators) -> torch.Tensor:
        """One noise latent per generator (continuing its stream), times the scheduler's ``init_noise_sigma``."""
        from diffusers.utils.torch_utils import randn_tensor

        plan = self.plan
        shape = (mmdit if plan.transformer else unet_family).latent_shape(self.pipe, plan.height, plan.width)
        where = self._noise_device()
        noise = [randn_tensor(shape, generator=g, device=where, dtype=self.dtype) for g in generators]
        noise = torch.cat(noise).to(self.device)
        sigma = getattr(self.scheduler, "init_noise_sigma", None)  # flow matching: none, the noise is x at σ = 1
        return noise if sigma is None else noise * sigma

    def denoise(self, z: torch.Tensor, i: int, t) -> torch.Tensor:
        """CFG noise prediction on the (updated) latent, then the scheduler step; the recorder
        watches the conditional rows of this forward at recorded steps."""
        n = len(z)
        sinks = self.recorder.sinks(i) if self.recorder else {}
        x = torch.cat([z, z]) if self.cfg else z
        x = self.scheduler.scale_model_input(x, t) if hasattr(self.scheduler, "scale_model_input") else x
        eps, probs = self.predict(x, t, self.conditioning.unet_kwargs(n, cfg=self.cfg), list(sinks))
        for name, p in probs.items():  # in the order the layers ran
            sinks[name](name, p)
        if self.cfg:
            uncond, cond = eps.chunk(2)
            eps = uncond + self.plan.guidance_scale * (cond - uncond)
        if sinks:
            self.recorder.end_step(i, t)
        if z.is_meta:  # the scheduler reads values: a shapes-only pipeline can be planned and traced, not sampled
            raise AnelabError(
                "a pipeline on the meta device holds shapes only: it can be planned (plan_run) and its forward traced, "
                "not sampled; load it on cpu or cuda to generate"
            )
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
            label = self.method.label if self.method is not None else "guidance"
            warnings.warn(
                f"non-finite {label} gradient at {steps} guided step(s): the affected samples were not moved there "
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
            reading = None if self.plan.reading is None else self.plan.reading.key()  # a transformer's text columns
            key = (tuple(read), rows.start, rows.stop, reading) if read else None
            graph = self.graphs.get("CFG forward", key, forward, inputs, self.capture)
        out = forward(inputs) if graph is None else graph(inputs)
        return out.pop("eps"), {k.removeprefix("probs:"): v for k, v in out.items()}

    # -- guidance ------------------------------------------------------------------------------
    def measure(self, z: torch.Tensor, t, i: int, rows: torch.Tensor | None = None, term: str = "loss") -> Measure:
        """The method's measurement at ``z`` (the batch's ``rows``; None: all), carrying its state from the measurement
        before (:class:`anelab.measure.Measurer`); on the fast path replayed, with ∇ of ``term``, from a CUDA graph of
        the run's batch (refinement's subsets and a method's staged updates run eagerly)."""
        unet_kwargs = self.conditioning.unet_kwargs(len(z), cfg=False)
        previous = (
            self.state if rows is None or self.state is None else map_tensors(lambda t: t[rows], self.state)
        )  # the rows' own
        eager = self.graphs is None or len(self.method.stages(self.plan.subjects)) > 1 or rows is not None
        eager = eager or self.method.refine_term != "loss"  # two gradients of one forward
        graph = None
        if not eager:
            inputs = {"z": z, "t": torch.as_tensor(t, device=z.device), **fast_path.flat(unet_kwargs)}
            if self.layout_targets is not None:
                inputs["targets"] = self.layout_targets
            if previous is not None:
                inputs |= fast_path.flat({"state": previous})
            fn = self.measurer.graphable(term, i)
            graph = self.graphs.get("guided step", self.measurer.key(term, i), fn, inputs, self.capture)
        if graph is None:
            measure = self.measurer(z, t, unet_kwargs, step=i, previous=previous, targets=self.layout_targets)
        else:
            measure = Measure.from_outputs(graph(inputs))
        if measure.state is not None and self.method.state_per_measurement:  # the next measurement starts from it
            if rows is None or self.state is None:
                self.state = map_tensors(lambda t: t.detach().clone(), measure.state)
            else:
                put_rows(self.state, measure.state, rows)
        return measure

    def guide(self, z: torch.Tensor, i: int, t) -> torch.Tensor:
        """The method at loop index ``i``: measure, refine at a refinement step, one regular update."""
        method, n = self.method, len(self.plan.timesteps)
        alpha = float(self.plan.step_sizes[i])
        regular = method.updates(i, n)
        refinement = method.refinement(i)
        self.nonfinite = torch.zeros(len(z), dtype=torch.bool, device=z.device)
        first = end = self.measure(z, t, i, term=method.refine_term if refinement else "loss")
        triggered = torch.zeros(len(z), dtype=torch.bool, device=z.device)
        iterations = torch.zeros(len(z), dtype=torch.long, device=z.device)
        reached = torch.zeros(len(z), dtype=torch.bool, device=z.device)  # read only at refinement steps
        threshold = None
        if refinement is not None:
            threshold, cap = refinement
            z, end, triggered, iterations = self.refine(z, t, i, first, threshold, cap, alpha, need_final_grad=regular)
            reached = ~method.violates(end.terms, threshold)
        updated = iterations > 0
        stages = method.stages(self.plan.subjects)
        if regular and len(stages) > 1:  # e.g. A&E's two-stage layout: the layout term's step first
            for term in stages[:-1]:
                z = self.stage_step(z, t, i, alpha, end, term)
                end = self.measure(z, t, i)
            updated = torch.ones_like(updated)
        if regular:
            move = end.terms["loss"] != 0  # no update when the loss is exactly 0 (§1.5)
            if "loss" in end.grads or move.any():  # a replayed graph brings the gradient: no need to ask the GPU
                grad = self.gradient(end)
                move = move & ~self.nonfinite
                z = torch.where(move[:, None, None, None], z - alpha * grad, z)
            updated = updated | move
        if end.state is not None and not method.state_per_measurement:  # the next step's measurements start from it
            self.state = map_tensors(lambda t: t.detach().clone(), end.state)
        self.nonfinite_steps += self.nonfinite.any()
        self.traces.add(
            step=i,
            timestep=self.plan.timesteps[i],  # t itself is on the device: int(t) would wait for the GPU
            step_size=alpha,
            threshold=np.nan if threshold is None else threshold,
            first=first.terms,
            end=end.terms,
            triggered=triggered,
            refinement_iterations=iterations,
            reached=reached,
            updated=updated,
            nonfinite=self.nonfinite,
        )
        return z.detach()

    def refine(self, z, t, i: int, first: Measure, threshold: float, cap: int, alpha: float, need_final_grad: bool):
        """Iterative refinement (§1.8) for the samples that violate the threshold (the method's rule).

        Official exit rule, per sample: iteration k measures at the current latent, steps if the refined
        term ≠ 0, and the loop goes on while that measurement (taken *before* the step) violates the threshold
        and k < ``cap``; then one re-measure at the final latent, whose loss gradient the regular update uses.
        Iteration 1 re-uses the step's first measurement (same latent, same result), and one batched forward
        serves as the next iteration of the samples going on and the re-measure of those that stop.
        """
        method, term = self.method, self.method.refine_term
        triggered = method.violates(first.terms, threshold)
        iterations = torch.zeros(len(z), dtype=torch.long, device=z.device)
        if cap == 0 or not triggered.any():
            return z, first, triggered, iterations
        grad_first = self.gradient(first, term=term)
        if need_final_grad:
            self.gradient(first)  # the loss gradient of the samples that are not refined (the same one for A&E)
        end = first.detached(keep_grad=need_final_grad)
        z = z.clone()
        active = triggered.nonzero()[:, 0]
        value_k, violates_k, grad_k = first.terms[term][active], triggered[active], grad_first[active]
        if method.state_per_measurement:  # the official loop measures again before its first update: the state moves
            again = self.measure(z[active], t, i, rows=active)
            grad_k = self.gradient(again, active, term)
            value_k, violates_k = again.terms[term], method.violates(again.terms, threshold)
        while active.numel():
            iterations[active] += 1
            moving = value_k != 0
            z[active[moving]] -= alpha * grad_k[moving]
            going_on = violates_k & (iterations[active] < cap)
            again = self.measure(z[active], t, i, rows=active)  # next iteration's forward, or the final re-measure
            more = bool(going_on.any())
            if more:
                self.gradient(again, active, term)
            if need_final_grad:
                self.gradient(again, active)
            end.put(active[~going_on], again, ~going_on)
            active = active[going_on]
            value_k, violates_k = again.terms[term][going_on], method.violates(again.terms, threshold)[going_on]
            grad_k = again.grads[term][going_on] if more else None
        return z, end, triggered, iterations

    def stage_step(self, z: torch.Tensor, t, i: int, alpha: float, at: Measure, term: str) -> torch.Tensor:
        """One staged update (e.g. the original study's layout step, §0x7): ``z − α·∇ term``, taken at ``z``
        (``at``: a measurement of ``z`` whose graph is alive, else a new one)."""
        at = at if at.leaf is not None else self.measure(z, t, i)
        with torch.enable_grad():
            grad = torch.autograd.grad(at.terms[term].sum(), at.leaf, retain_graph=True)[0]
        finite = torch.isfinite(grad).flatten(1).all(dim=1)
        self.nonfinite |= ~finite
        return z - alpha * torch.where(finite[:, None, None, None], grad, torch.zeros_like(grad))

    def gradient(self, measure: Measure, rows: torch.Tensor | None = None, term: str = "loss") -> torch.Tensor:
        """``measure.gradient(term)``, noting the samples (batch ``rows``) whose gradient was not finite."""
        grad = measure.gradient(term)
        if measure.nonfinite is not None:  # None: a copy whose gradient was noted where it was computed
            if rows is None:
                self.nonfinite |= measure.nonfinite
            else:
                self.nonfinite[rows] |= measure.nonfinite  # on the device (rows is a device tensor): no host sync
        return grad


class _NoiseContext:
    """What a method's ``optimise_noise`` may use of the sampler: measurements at the first timestep, the seeds'
    generators (to draw fresh noise from each seed's own stream) and the plan."""

    def __init__(self, sampler: _Sampler, z: torch.Tensor):
        self.sampler, self.z, self.plan = sampler, z, sampler.plan
        self.t = sampler.scheduler.timesteps[0]

    def measure(self, z: torch.Tensor) -> Measure:
        """The method's terms at ``z`` (the UNet's input at the first timestep), with autograd alive to ``z``."""
        s = self.sampler
        scale = input_scale(s.scheduler, self.t)
        kwargs = s.conditioning.unet_kwargs(len(z), cfg=False)
        return s.measurer(z * scale, self.t, kwargs, step=0, previous=None, targets=s.layout_targets)

    def fresh_noise(self, rows: list[int]) -> torch.Tensor:
        """New initial noise for the samples ``rows``, each from its seed's generator (continuing its stream)."""
        return self.sampler.draw_noise([self.sampler.generators[r] for r in rows])


# -- preparation ---------------------------------------------------------------------------------
#: What a ``callback_on_step_end`` may read and return (diffusers' Stable Diffusion pipelines' names).
CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds")


def callback_inputs(request: Request) -> tuple[str, ...]:
    """The tensors the request's callback reads: a diffusers ``PipelineCallback``'s ``tensor_inputs``, else the
    request's ``callback_on_step_end_tensor_inputs`` (checked)."""
    callback = request.callback_on_step_end
    names = getattr(callback, "tensor_inputs", None) or request.callback_on_step_end_tensor_inputs
    if isinstance(names, str):
        names = (names,)
    unknown = [n for n in names if n not in CALLBACK_TENSOR_INPUTS]
    if unknown:
        raise AnelabError(
            f"callback_on_step_end_tensor_inputs {unknown} unknown; allowed: {list(CALLBACK_TENSOR_INPUTS)}"
        )
    return tuple(names)


def _shape_of(value) -> str:
    return f"shape {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def plan_run(pipe, request: Request | str, **arguments) -> RunPlan:
    """Check a :class:`Request` (or ``prompt`` with :func:`generate`'s keyword arguments) against ``pipe`` and
    decide the run, before any denoising (each failure is one clear :class:`AnelabError`). The one pre-flight
    check: the study runner calls it for every (variant, prompt) before making any image."""
    if not isinstance(request, Request):
        request = Request.of(request, **arguments)
    elif arguments:
        request = dataclasses.replace(request, **arguments)
    prompt = request.prompt
    if not isinstance(prompt, str) or not prompt.strip():
        raise AnelabError(f"prompt must be a non-empty string, got {prompt!r}")
    seeds = require_seeds(request.seeds)
    kind = models.family(pipe)
    transformer = kind in mmdit.FAMILIES
    default_steps, default_scale = models.DEFAULTS[kind]
    steps = default_steps if request.num_inference_steps is None else request.num_inference_steps
    if not is_int(steps) or steps < 1:
        raise AnelabError(f"num_inference_steps must be an int >= 1, got {steps!r}")
    guidance_scale = default_scale if request.guidance_scale is None else request.guidance_scale
    guidance_scale = require_number("guidance_scale", guidance_scale, minimum=0)  # <= 1: no CFG (diffusers')
    _check_transformer_options(request, kind)
    if request.callback_on_step_end is not None:
        if not callable(request.callback_on_step_end):
            raise AnelabError(
                f"callback_on_step_end must be callable as fn(pipe, i, t, callback_kwargs), got {request.callback_on_step_end!r}"
            )
        callback_inputs(request)
    if request.output_type not in OUTPUT_TYPES:
        raise AnelabError(f"output_type must be one of {OUTPUT_TYPES}, got {request.output_type!r}")
    generator_device = request.generator_device
    if generator_device not in GENERATOR_DEVICES:
        raise AnelabError(f"generator_device must be one of {GENERATOR_DEVICES}, got {generator_device!r}")
    if generator_device == "cuda" and not torch.cuda.is_available():
        raise AnelabError(
            "generator_device='cuda' draws the noise with torch.Generator('cuda') as the official code does; torch sees no GPU here"
        )
    device = denoiser(pipe).device
    if request.fast and not fast_path.available(device):
        raise AnelabError(
            f"fast=True replays CUDA graphs and needs the pipeline on a CUDA GPU; it is on {device} (leave fast=None)"
        )
    low_memory = memory.requested(request.low_memory)
    method = request.method
    scale = getattr(pipe, "vae_scale_factor", 8)
    side = mmdit.native_size(pipe) if transformer else pipe.unet.config.sample_size * scale
    height, width = request.height or side, request.width or side
    step = mmdit.multiple(pipe) if transformer else scale
    for name, value in (("height", height), ("width", width)):
        if not is_int(value) or value < step or value % step:
            raise AnelabError(f"{name} must be a positive multiple of {step}, got {value!r}")
    subjects = resolve(pipe.tokenizer, prompt, request.subjects)
    models.check_tokenizers(pipe, prompt)
    words = prompt_tokens(pipe.tokenizer, prompt)
    eot = eot_index(pipe.tokenizer, prompt)
    latent = (height // scale, width // scale)
    t5_length = 0
    if transformer:
        t5_length = request.max_sequence_length
        t5_length = mmdit.DEFAULTS[kind]["t5_length"] if t5_length is None else t5_length
        if not is_int(t5_length) or not 1 <= t5_length <= 512:
            raise AnelabError(f"max_sequence_length must be an int in 1..512 (T5 positions), got {t5_length!r}")
        layers = mmdit.choose_blocks(pipe, mmdit.blocks(pipe, height, width), request.blocks)
    else:
        layers = hk.cross_attention_layers(pipe.unet, *latent)
    trained = getattr(pipe.scheduler.config, "num_train_timesteps", None)
    if trained and steps > trained:
        raise AnelabError(
            f"num_inference_steps {steps} is more than the scheduler's {trained} training timesteps: at most {trained}"
        )
    timesteps = schedule(pipe, steps, height, width)
    reading = None
    columns = models.softmax_tokens(pipe, "legacy")
    normaliser = methods.GuidanceConfig().normalised(columns)
    active, read_layers, step_sizes, layout_targets = None, {}, np.zeros(len(timesteps)), None
    measured = [s.noun for s in subjects]
    roles = [s.role for s in subjects]
    if method is not None and transformer and request.thresholds == "sigma":
        method = method.remapped(mmdit.sigma_placement(pipe, steps, height, width))
    if method is not None:
        method.check_subjects(subjects, words)
        active = method.normalised(columns) if isinstance(method, TokenSoftmax) else method
        if isinstance(active, TokenSoftmax):
            normaliser = active
        measured, roles = active.measured(subjects)
        if transformer:
            read_layers = _read_blocks(pipe, method, layers, height, width)
        else:
            read_layers = _read_layers(pipe, method, layers, latent, height, width)
        main = read_layers[("cross", method.reads().cross[0])][0].shape
        if getattr(active, "smooth", False) and active.kernel_size // 2 >= min(main):
            raise AnelabError(
                f"kernel_size {active.kernel_size} is too large for {main[0]}x{main[1]} attention maps (at most {2 * min(main) - 1})"
            )
        method.check_schedule(len(timesteps))
        step_sizes = method.step_sizes(len(timesteps))
        if transformer:
            native = mmdit.grid(pipe, height, width)
            reading = mmdit.Reading(
                kind,
                mmdit.TextColumns.of(pipe, prompt, request.token_maps, t5_length),
                request.text_softmax,
                native,
                main,
            )
            if request.flow_step == "snr":  # the same step relative to the signal as SD 1.x's (reference §2)
                sigmas = flow_sigmas(pipe, steps, height, width)
                step_sizes = step_sizes * ((1 - sigmas) ** 2 + sigmas**2)
        targets = [s.target for s in subjects if s.target is not None]
        if targets:
            ordered = [s for role in ("excite", "suppress", "layout") for s in subjects if s.role == role]
            points = [s.target for s in ordered if s.target is not None]
            layout_targets = torch.stack([gaussian_target(p, main, active.layout_sigma) for p in points])
            if not torch.isfinite(layout_targets).all():
                raise AnelabError(
                    f"layout_sigma {active.layout_sigma:g} is too narrow for the {main[0]}x{main[1]} guidance grid: the "
                    f"target would be empty; use at least {0.5 / max(main):.3g} (half a cell)"
                )
    record = request.record
    record_layers = layers
    if record is not None and transformer:  # every block, on the guidance grid (or the one Record.resolutions names)
        reading, record_layers = _recorded_blocks(pipe, request, reading, prompt, t5_length, height, width)
    if record is not None:
        nouns = [p for p, r in zip(measured, roles) if r != "modifier"]
        record = plan_record(
            record,
            pipe=pipe,
            prompt=prompt,
            subjects=nouns,
            measured=measured,
            eot=eot,
            seeds=seeds,
            timesteps=timesteps,
            layers=record_layers,
            config=normaliser,
            height=height,
            width=width,
        )
    every = [layer for group in read_layers.values() for layer in group]
    return RunPlan(
        request=request,
        prompt=prompt,
        subjects=subjects,
        words=words | {eot: "<eot>"},
        token_indices=[s.noun for s in subjects if s.role == "excite"],
        measured=measured,
        roles=roles,
        token_words=[(words | {eot: "<eot>"})[i] for i in measured],
        layout_targets=layout_targets,
        eot=eot,
        seeds=seeds,
        method=method,
        active=active,
        guidance_scale=guidance_scale,
        height=int(height),
        width=int(width),
        timesteps=timesteps,
        step_sizes=step_sizes,
        read_layers=read_layers,
        stop_layer=max(every, key=hk.Layer.sort_key).name if every else None,
        columns=columns,
        normaliser=normaliser,
        record=record,
        generator_device=generator_device,
        fast=(fast_path.available(device) and not transformer) if request.fast is None else bool(request.fast),
        low_memory=low_memory,
        num_inference_steps=int(steps),
        family=kind,
        reading=reading,
        t5_length=t5_length,
    )


def _read_layers(pipe, method: Method, cross_layers, latent, height: int, width: int) -> dict:
    """``(kind, res) -> layers`` of everything ``method`` reads, or a one-line error naming what the model has."""
    reads = method.reads()
    out = {}
    for kind, wanted, layers in (
        ("cross", reads.cross, cross_layers),
        ("self", reads.self_attention, hk.self_attention_layers(pipe.unet, *latent) if reads.self_attention else []),
    ):
        have = sorted({layer.res for layer in layers}, reverse=True)
        for res in wanted:
            found = hk.layers_at(layers, res)
            if not found:
                where = f"at {height}x{width}: this model has {kind}-attention at resolutions {have}"
                if kind == "cross" and res == reads.cross[0]:
                    raise AnelabError(f"attention_res {res} does not exist {where}")
                raise AnelabError(
                    f"{method.name} reads {kind}-attention at resolution {res}, which does not exist {where}"
                )
            out[(kind, res)] = found
    return out


def schedule(pipe, num_inference_steps: int, height: int | None = None, width: int | None = None) -> list[int]:
    """The scheduler's timesteps for ``num_inference_steps`` (one per loop index; PNDM 50 steps → 51; flow matching:
    ``int(1000·σ)``, FLUX's at ``height`` × ``width``, default native)."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    set_timesteps(pipe, scheduler, int(num_inference_steps), (height, width))
    return [int(t) for t in scheduler.timesteps]


def flow_sigmas(pipe, num_inference_steps: int, height: int, width: int) -> np.ndarray:
    """σ at each loop index of a flow-matching schedule (``x = (1−σ)x₀ + σε``)."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    set_timesteps(pipe, scheduler, int(num_inference_steps), (height, width))
    return scheduler.sigmas[: len(scheduler.timesteps)].double().numpy()


def set_timesteps(pipe, scheduler, num_inference_steps: int, size, device=None) -> None:
    """The model's own pipeline's schedule (SD 3 and FLUX: :func:`anelab.mmdit.set_timesteps`); ``size`` a
    :class:`RunPlan` or ``(height, width)`` (None: native)."""
    if not mmdit.is_mmdit(pipe):
        scheduler.set_timesteps(num_inference_steps, device=device)
        return
    height, width = (size.height, size.width) if isinstance(size, RunPlan) else size
    side = mmdit.native_size(pipe)
    mmdit.set_timesteps(pipe, scheduler, num_inference_steps, height or side, width or side, device)


def input_scale(scheduler, t) -> float:
    """What ``scale_model_input`` multiplies the latent by at ``t`` (1 for PNDM, DDIM and flow matching)."""
    if not hasattr(scheduler, "scale_model_input"):
        return 1.0
    return float(scheduler.scale_model_input(torch.ones(()), t))


def denoiser(pipe):
    """What the loop calls as ``net(x, t, **kwargs).sample``: the UNet, or a transformer as :class:`anelab.mmdit.Denoiser`."""
    return mmdit.denoiser(pipe) if mmdit.is_mmdit(pipe) else pipe.unet


def _check_transformer_options(request: Request, kind: str) -> None:
    """The SD 3 / FLUX options: allowed values, and refused on a UNet (one line naming what to use there)."""
    transformer = kind in mmdit.FAMILIES
    given = [n for n in ("blocks", "token_maps", "max_sequence_length") if getattr(request, n) is not None]
    given += [
        n
        for n, d in (("text_softmax", "text"), ("flow_step", "index"), ("thresholds", "index"))
        if getattr(request, n) != d
    ]
    if given and not transformer:
        raise AnelabError(
            f"{', '.join(given)}: for SD 3 and FLUX (transformers); this is {kind}, whose maps come from attention_res"
        )
    for name, allowed in (
        ("text_softmax", mmdit.TEXT_SOFTMAX),
        ("flow_step", ("index", "snr")),
        ("thresholds", ("index", "sigma")),
    ):
        if getattr(request, name) not in allowed:
            raise AnelabError(f"{name} must be one of {allowed}, got {getattr(request, name)!r}")
    if request.token_maps is not None and request.token_maps not in mmdit.TOKEN_MAPS:
        raise AnelabError(f"token_maps must be one of {mmdit.TOKEN_MAPS}, got {request.token_maps!r}")


def _recorded_blocks(pipe, request: Request, reading, prompt: str, t5_length: int, height: int, width: int):
    """SD 3 / FLUX: ``(reading, blocks)`` a recording reads: every block of the model, on one grid for the whole run
    (the guidance grid; without guidance the side ``Record.resolutions`` names, default 16, pooled)."""
    wanted = request.record.resolutions
    if reading is None:
        kind = mmdit.family(pipe)
        side = mmdit.COMPARISON_GRID if wanted is None else wanted[0]
        if wanted is not None and len(wanted) > 1:
            raise AnelabError(f"Record.resolutions {list(wanted)}: a transformer has one grid per run; name one side")
        grid = mmdit.read_grid(pipe, side, height, width, "Record.resolutions")
        columns = mmdit.TextColumns.of(pipe, prompt, request.token_maps, t5_length)
        reading = mmdit.Reading(kind, columns, request.text_softmax, mmdit.grid(pipe, height, width), grid)
    elif wanted is not None and list(wanted) != [reading.read[1]]:
        raise AnelabError(
            f"Record.resolutions {list(wanted)}: on a transformer the recording reads the guidance grid, "
            f"{reading.read[0]}x{reading.read[1]}; record resolutions=None or [{reading.read[1]}]"
        )
    return reading, [hk.Layer(b.name, b.place, reading.read) for b in mmdit.blocks(pipe, height, width)]


def _read_blocks(pipe, method: Method, chosen: list[hk.Layer], height: int, width: int) -> dict:
    """``("cross", res) -> blocks`` on SD 3 / FLUX: the chosen blocks, on the grid ``attention_res`` means there."""
    reads = method.reads()
    if reads.self_attention:
        raise AnelabError(
            f"{method.name} reads self-attention, which a transformer's joint attention does not separate; it runs on "
            "SD 1.x, 2.x and SDXL"
        )
    if len(set(reads.cross)) > 1:
        raise AnelabError(f"{method.name} reads several attention resolutions; a transformer has one grid per block")
    shape = mmdit.read_grid(pipe, reads.cross[0], height, width)
    return {("cross", reads.cross[0]): [hk.Layer(b.name, b.place, shape) for b in chosen]}


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
    """The VAE decode of the model's own pipeline (:func:`anelab.unet.decode`, :func:`anelab.mmdit.decode`)."""
    return (mmdit if mmdit.is_mmdit(pipe) else unet_family).decode(pipe, latents, output_type)
