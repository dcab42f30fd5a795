"""`generate`: Stable Diffusion with Attend-and-Excite guidance, batched over seeds.

Reading order: :func:`generate` validates everything into a :class:`_Plan`, then
:meth:`_Sampler.run` is the denoising loop. Each loop iteration ``i`` does (reference §1.7):

1. :meth:`_Sampler.guide` — only on iterations that can change the latent
   (``i < max_iter_to_alter`` or ``i`` a threshold step):
   a. :meth:`_Sampler.measure`: conditional-only UNet forward at the current latent (no CFG, no
      ``scale_model_input``), stopped after the last layer at ``attention_res``; smoothed max
      attention per subject token and the loss ``max_s (1 − m_s)``;
   b. at a threshold step, :meth:`_Sampler.refine` for the samples below it (§1.8);
   c. one regular step ``z ← z − α_i ∇L`` while ``i < max_iter_to_alter`` (skipped where L = 0).
2. :meth:`_Sampler.denoise` — the usual CFG prediction on the *updated* latent and the scheduler step.

Every seed in the batch carries its own refinement state; seed ``s`` starts from the noise of
``torch.Generator("cpu").manual_seed(s)`` exactly as a single-seed run does.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import hooks as hk
from .config import GuidanceConfig
from .errors import AnelabError
from .objectives import excite_loss, max_attention
from .cache import AttentionCache
from .recording import Record, Recorder, RecordPlan, plan_record
from .tokens import eot_index, prompt_tokens, resolve_tokens

TRACE_COLUMNS = [
    "seed", "step", "timestep", "token", "token_index",
    "max_attention",  # smoothed max attention at the step's first measurement (before any update)
    "loss",  # the sample's A&E loss at that measurement
    "step_size", "threshold",  # α_i; the threshold of a threshold step, else NaN
    "triggered",  # the threshold step needed refinement
    "refinement_iterations",  # refinement updates made at this step
    "reached",  # after refinement the threshold holds (NA off threshold steps)
    "updated",  # the latent was changed at this step
    "final_max_attention", "final_loss",  # what the regular update descended (after refinement)
]  # fmt: skip

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


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
class _Plan:
    """Everything :func:`generate` decided before denoising starts."""

    prompt: str
    token_indices: list[int]
    token_words: list[str]
    eot: int
    seeds: list[int]
    config: GuidanceConfig | None
    guidance_scale: float
    height: int
    width: int
    timesteps: list[int]
    step_sizes: np.ndarray
    guidance_layers: list[hk.Layer]  # those at config.attention_res, execution order
    record: RecordPlan | None  # what to record of the CFG forward


def generate(
    pipe,
    prompt: str,
    tokens: Sequence[str | int] = (),
    seeds: Sequence[int] = (0,),
    config: GuidanceConfig | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    output_type: str = "pil",
    record: Record | None = None,
    progress: bool = True,
) -> GuidedOutput:
    """Sample ``prompt`` for every seed at once; A&E-guided on ``tokens`` unless ``config`` is None.

    ``tokens`` are words of the prompt or CLIP positions (``<sot>`` = 0). ``config=None`` is plain
    Stable Diffusion with the same seeds. ``record=Record(...)`` keeps cross-attention maps and
    token statistics of the CFG forward in ``out.attention``. See the module docstring for the loop.
    """
    plan = _plan(pipe, prompt, tokens, seeds, config, num_inference_steps, guidance_scale, height, width, output_type, record)
    recorder = Recorder(plan.record, prompt, plan.seeds) if plan.record else None
    hooked = plan.guidance_layers + (plan.record.layers if plan.record else [])
    start = time.perf_counter()
    with torch.no_grad(), _frozen(pipe.unet), hk.attention_capture(pipe.unet, hooked) as hooks:
        sampler = _Sampler(pipe, plan, hooks, recorder)
        latents = sampler.run(num_inference_steps, progress)
        images = None if output_type == "latent" else _decode(pipe, latents, output_type)
    seconds = time.perf_counter() - start
    attention = None
    if recorder:
        meta = {"config": None if config is None else config.to_dict(), "record": record.to_dict(), "guidance_scale": float(guidance_scale),
                "height": plan.height, "width": plan.width, "num_inference_steps": int(num_inference_steps)}  # fmt: skip
        attention = recorder.cache(meta)
    return GuidedOutput(
        images=images,
        latents=latents,
        trace=sampler.trace(),
        attention=attention,
        seeds=plan.seeds,
        prompt=prompt,
        token_indices=plan.token_indices,
        timesteps=plan.timesteps,
        seconds=seconds,
    )


class _Measure:
    """One conditional-only forward: latent leaf, smoothed max attention [B,T], loss [B]; ∇ on demand."""

    def __init__(self, leaf: torch.Tensor | None, m: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor | None = None):
        self.leaf, self.m, self.loss, self._grad = leaf, m, loss, grad

    def grad(self) -> torch.Tensor:
        """∇_z L per sample (samples are independent in the UNet, so ∇ of the sum splits)."""
        if self._grad is None:
            with torch.enable_grad():
                self._grad = torch.autograd.grad(self.loss.sum(), self.leaf)[0]
        return self._grad


class _Sampler:
    """The denoising loop of one :func:`generate` call (module docstring)."""

    def __init__(self, pipe, plan: _Plan, hooks: hk.AttentionHooks, recorder: Recorder | None = None):
        self.pipe, self.plan, self.hooks, self.unet, self.recorder = pipe, plan, hooks, pipe.unet, recorder
        self.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # stateful: own copy
        self.device, self.dtype = pipe.unet.device, pipe.unet.dtype
        self.cfg = plan.guidance_scale > 1.0
        cond, uncond = pipe.encode_prompt(plan.prompt, self.device, 1, self.cfg)
        self.cond, self.uncond = cond.to(self.dtype), None if uncond is None else uncond.to(self.dtype)
        self.config = plan.config
        self.last_update = plan.config.last_update_iteration(len(plan.timesteps)) if plan.config else 0
        self.rows: list[dict] = []

    # -- the loop -----------------------------------------------------------------------------
    def run(self, num_inference_steps: int, progress: bool) -> torch.Tensor:
        z = self.initial_latents()
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        label = "A&E" if self.config else "SD"
        for i, t in enumerate(tqdm(self.scheduler.timesteps, desc=label, disable=not progress, leave=False)):
            if self.config is not None and (i < self.last_update or i in self.config.thresholds):
                z = self.guide(z, i, t)
            z = self.denoise(z, i, t)
        return z

    def initial_latents(self) -> torch.Tensor:
        """Per-seed CPU-generator noise, identical to a single-seed run's (diffusers' randn_tensor)."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = (1, self.unet.config.in_channels, self.plan.height // 8, self.plan.width // 8)
        noise = [
            randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(s), device=self.device, dtype=self.dtype)
            for s in self.plan.seeds
        ]
        return torch.cat(noise) * self.scheduler.init_noise_sigma

    def denoise(self, z: torch.Tensor, i: int, t) -> torch.Tensor:
        """CFG noise prediction on the (updated) latent, then the scheduler step; the recorder
        watches the conditional rows of this forward at recorded steps."""
        n = len(z)
        sinks = self.recorder.sinks(i) if self.recorder else {}
        with self.hooks.reading(sinks, observe=slice(n, 2 * n) if self.cfg else slice(0, n)):
            if self.cfg:
                x = self.scheduler.scale_model_input(torch.cat([z, z]), t)
                context = torch.cat([self.uncond.expand(n, -1, -1), self.cond.expand(n, -1, -1)])
                uncond, cond = self.unet(x, t, encoder_hidden_states=context).sample.chunk(2)
                eps = uncond + self.plan.guidance_scale * (cond - uncond)
            else:
                eps = self.unet(self.scheduler.scale_model_input(z, t), t, encoder_hidden_states=self.cond.expand(n, -1, -1)).sample
        if sinks:
            self.recorder.end_step(i, t)
        return self.scheduler.step(eps, t, z).prev_sample

    # -- Attend-and-Excite ---------------------------------------------------------------------
    def measure(self, z: torch.Tensor, t) -> _Measure:
        """Conditional-only forward at ``z`` (§1.6), stopped after the last ``attention_res`` layer."""
        leaf = z.detach().requires_grad_(True)
        mean = hk.MeanAttention()
        layers = self.plan.guidance_layers
        with torch.enable_grad():
            with self.hooks.reading({layer.name: mean for layer in layers}, stop_after=layers[-1].name):
                self.unet(leaf, t, encoder_hidden_states=self.cond.expand(len(leaf), -1, -1))
            m = max_attention(mean.maps(layers[0].shape), self.plan.token_indices, self.plan.eot, self.config)
            return _Measure(leaf, m, excite_loss(m))

    def guide(self, z: torch.Tensor, i: int, t) -> torch.Tensor:
        """A&E at loop index ``i``: measure, refine at a threshold step, one regular update (§1.7)."""
        alpha = float(self.plan.step_sizes[i])
        regular = i < self.last_update
        first = end = self.measure(z, t)
        triggered = torch.zeros(len(z), dtype=torch.bool, device=z.device)
        iterations = torch.zeros(len(z), dtype=torch.long, device=z.device)
        reached = None
        if i in self.config.thresholds:
            threshold = self.config.thresholds[i]
            z, end, triggered, iterations = self.refine(z, t, first, threshold, alpha, need_final_grad=regular)
            reached = end.loss <= max(0.0, 1.0 - threshold)
        updated = iterations > 0
        if regular:
            move = end.loss != 0  # no update when the loss is exactly 0 (§1.5)
            if move.any():
                z = torch.where(move[:, None, None, None], z - alpha * end.grad(), z)
            updated = updated | move
        self.log(i, t, alpha, first, end, triggered, iterations, reached, updated)
        return z.detach()

    def refine(self, z, t, first: _Measure, threshold: float, alpha: float, need_final_grad: bool):
        """Iterative refinement (§1.8) for the samples whose loss exceeds ``1 − threshold``.

        Official exit rule, per sample: iteration k measures L at the current latent, steps if
        L ≠ 0, and the loop goes on while that L (measured *before* the step) exceeds the target and
        k < ``max_refinement_steps``; then one re-measure at the final latent, whose gradient the
        regular update uses. Iteration 1 re-uses the step's first measurement (same latent, same
        result), and one batched forward serves as the next iteration of the samples going on and
        the re-measure of those that stop.
        """
        target = max(0.0, 1.0 - threshold)
        n = len(z)
        triggered = first.loss > target
        iterations = torch.zeros(n, dtype=torch.long, device=z.device)
        if not triggered.any() or self.config.max_refinement_steps == 0:
            return z, first, triggered, iterations
        grad_first = first.grad()
        m_end, loss_end = first.m.detach().clone(), first.loss.detach().clone()
        grad_end = grad_first.clone() if need_final_grad else None
        z = z.clone()
        active = triggered.nonzero()[:, 0]
        loss_k, grad_k = first.loss[active], grad_first[active]
        while active.numel():
            iterations[active] += 1
            moving = loss_k != 0
            z[active[moving]] -= alpha * grad_k[moving]
            going_on = (loss_k > target) & (iterations[active] < self.config.max_refinement_steps)
            again = self.measure(z[active], t)  # next iteration's forward, or the final re-measure
            need_grad = going_on.any() or grad_end is not None
            grad = again.grad() if need_grad else None
            stop = active[~going_on]
            m_end[stop], loss_end[stop] = again.m.detach()[~going_on], again.loss.detach()[~going_on]
            if grad_end is not None:
                grad_end[stop] = grad[~going_on]
            active, loss_k = active[going_on], again.loss[going_on]
            grad_k = grad[going_on] if grad is not None else None
        return z, _Measure(None, m_end, loss_end, grad_end), triggered, iterations

    # -- trace -----------------------------------------------------------------------------------
    def log(self, i, t, alpha, first, end, triggered, iterations, reached, updated):
        threshold = self.config.thresholds.get(i, np.nan)
        self.rows.append(
            dict(
                step=i,
                timestep=int(t),
                step_size=alpha,
                threshold=threshold,
                max_attention=first.m.detach().float().cpu().numpy(),
                loss=first.loss.detach().float().cpu().numpy(),
                triggered=triggered.cpu().numpy(),
                refinement_iterations=iterations.cpu().numpy(),
                reached=None if reached is None else reached.cpu().numpy(),
                updated=updated.cpu().numpy(),
                final_max_attention=end.m.detach().float().cpu().numpy(),
                final_loss=end.loss.detach().float().cpu().numpy(),
            )
        )

    def trace(self) -> pd.DataFrame:
        """Long table, one row per (seed, guided step, token)."""
        plan = self.plan
        n_seeds, n_tokens = len(plan.seeds), len(plan.token_indices)
        frames = []

        def per_sample(values):  # [B] → [B·T]
            return np.repeat(values, n_tokens)

        for row in self.rows:
            reached = pd.array([pd.NA] * n_seeds * n_tokens if row["reached"] is None else per_sample(row["reached"]), dtype="boolean")
            frames.append(
                pd.DataFrame(
                    {
                        "seed": np.repeat(plan.seeds, n_tokens),
                        "step": row["step"],
                        "timestep": row["timestep"],
                        "token": np.tile(plan.token_words, n_seeds),
                        "token_index": np.tile(plan.token_indices, n_seeds),
                        "max_attention": row["max_attention"].reshape(-1),
                        "loss": per_sample(row["loss"]),
                        "step_size": row["step_size"],
                        "threshold": row["threshold"],
                        "triggered": per_sample(row["triggered"]),
                        "refinement_iterations": per_sample(row["refinement_iterations"]),
                        "reached": reached,
                        "updated": per_sample(row["updated"]),
                        "final_max_attention": row["final_max_attention"].reshape(-1),
                        "final_loss": per_sample(row["final_loss"]),
                    }
                )
            )
        if not frames:
            return _empty_trace()
        return pd.concat(frames, ignore_index=True).sort_values(["seed", "step", "token_index"], ignore_index=True)


def _empty_trace() -> pd.DataFrame:
    dtypes = dict.fromkeys(TRACE_COLUMNS, "float64") | {
        "seed": "int64", "step": "int64", "timestep": "int64", "token": "object", "token_index": "int64",
        "triggered": "bool", "refinement_iterations": "int64", "reached": "boolean", "updated": "bool",
    }  # fmt: skip
    return pd.DataFrame({c: pd.Series(dtype=dtypes[c]) for c in TRACE_COLUMNS})


# -- preparation ---------------------------------------------------------------------------------
def _plan(pipe, prompt, tokens, seeds, config, steps, guidance_scale, height, width, output_type, record=None) -> _Plan:
    """Validate every argument before any denoising (each failure is one clear AnelabError)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise AnelabError(f"prompt must be a non-empty string, got {prompt!r}")
    seeds = _check_seeds(seeds)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise AnelabError(f"num_inference_steps must be an int >= 1, got {steps!r}")
    if output_type not in OUTPUT_TYPES:
        raise AnelabError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if config is not None and not isinstance(config, GuidanceConfig):
        raise AnelabError(f"config must be a GuidanceConfig or None (plain SD), got {type(config).__name__}")
    scale = getattr(pipe, "vae_scale_factor", 8)
    height = height or pipe.unet.config.sample_size * scale
    width = width or pipe.unet.config.sample_size * scale
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < scale or value % scale:
            raise AnelabError(f"{name} must be a positive multiple of {scale}, got {value!r}")
    if isinstance(tokens, (str, int)):
        tokens = [tokens]
    token_indices = resolve_tokens(pipe.tokenizer, prompt, tokens)
    words = [prompt_tokens(pipe.tokenizer, prompt)[i] for i in token_indices]
    layers = hk.cross_attention_layers(pipe.unet, height // scale, width // scale)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(int(steps))
    timesteps = [int(t) for t in scheduler.timesteps]
    guidance_layers: list[hk.Layer] = []
    step_sizes = np.zeros(len(timesteps))
    if config is not None:
        if not token_indices:
            raise AnelabError("guidance needs at least one subject token (tokens=[...]); use config=None for plain SD")
        guidance_layers = hk.layers_at(layers, config.attention_res)
        if not guidance_layers:
            available = sorted({layer.res for layer in layers}, reverse=True)
            raise AnelabError(
                f"attention_res {config.attention_res} does not exist at {height}x{width}: this model has "
                f"cross-attention at resolutions {available}"
            )
        h, w = guidance_layers[0].shape
        if config.smooth and config.kernel_size // 2 >= min(h, w):
            raise AnelabError(f"kernel_size {config.kernel_size} is too large for {h}x{w} attention maps (at most {2 * min(h, w) - 1})")
        config.check_schedule(len(timesteps))
        step_sizes = config.step_sizes(len(timesteps))
    eot = eot_index(pipe.tokenizer, prompt)
    if record is not None:
        record = plan_record(record, pipe, prompt, token_indices, eot, seeds, timesteps, layers, config, height, width)
    return _Plan(
        prompt=prompt,
        token_indices=token_indices,
        token_words=words,
        eot=eot,
        seeds=seeds,
        config=config,
        guidance_scale=float(guidance_scale),
        height=int(height),
        width=int(width),
        timesteps=timesteps,
        step_sizes=step_sizes,
        guidance_layers=guidance_layers,
        record=record,
    )


def _check_seeds(seeds) -> list[int]:
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        seeds = [seeds]
    seeds = list(seeds) if hasattr(seeds, "__iter__") else []
    if not seeds:
        raise AnelabError("seeds must be a non-empty list of ints")
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in seeds):
        raise AnelabError(f"seeds must be ints >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        duplicated = sorted({s for s in seeds if seeds.count(s) > 1})
        raise AnelabError(f"seeds must be distinct; repeated: {duplicated}")
    return [int(s) for s in seeds]


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
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)
