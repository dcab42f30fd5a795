"""The MMDiT family adapter: Stable Diffusion 3 / 3.5 and FLUX (``../reference/methods.md`` §2).

Everything :func:`anelab.generate` needs to know about a transformer pipeline lives here:

- **Blocks replace resolutions.** Every joint-attention block sees the same image-token grid (H/16 × W/16).
  :func:`blocks` lists them (SD 3: ``transformer_blocks.N.attn``, place ``joint``; FLUX: ``double`` for
  ``transformer_blocks.N.attn`` and ``single`` for ``single_transformer_blocks.N.attn``); :func:`choose_blocks`
  takes indices, ``"a-b"`` ranges or names. A method's ``attention_res`` is the grid its maps are read on: the
  native side, or 16 (the default), for which the maps are average-pooled to 16×16 like SD 1.x's A&E maps.
- **Tokens.** Guidance speaks CLIP positions (``<sot>`` = 0, the first word 1), as on SD 1.x. :class:`TextColumns`
  maps each of them to its joint-attention text keys: the CLIP key itself (SD 3 only), the T5 keys of the same
  characters (T5 has no ``<sot>``; a word split into pieces gets their sum; ``<eot>`` is T5's ``</s>``) or the mean
  of both (``token_maps="clip" | "t5" | "mean"``; default ``mean`` on SD 3, ``t5`` on FLUX, whose CLIP gives only
  the pooled vector).
- **Capture.** :class:`JointCapture` computes softmax(q_img·k_textᵀ/√d) itself on the read blocks only (after the
  q/k norms; FLUX: after RoPE, with the order [text, image] and, in single-stream blocks, the text length from
  outside); the block's output is its own processor's, so reading changes nothing. ``text_softmax="text"`` (default)
  is a softmax over the text keys alone — each image token's attention shared among the words, as cross-attention is
  on SD 1.x, which A&E's ×100 token softmax assumes; ``"joint"`` keeps the text columns of the joint softmax
  (image keys included: a few percent of the mass at most, so A&E's token softmax flattens).
- **Latents.** Drawn as the pipeline draws them (SD 3 ``[B, C, H/8, W/8]``; FLUX the same, packed 2×2 into tokens
  for the transformer only: the sampler always sees ``[B, C, h, w]``, on which the Euler step acts elementwise),
  no ``scale_model_input``, decoded with the VAE's ``shift_factor``. The schedule is the pipeline's (FLUX: its
  sigmas and the resolution's ``mu``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import weakref
from types import SimpleNamespace

import numpy as np
import torch

from .errors import AnelabError
from .hooks import Layer, StopForward

FAMILIES = ("sd3", "flux")
#: Family defaults: the pipelines' own (``StableDiffusion3Pipeline``: 28 steps, CFG 7.0; ``FluxPipeline``: 28 steps,
#: guidance embedding 3.5) and the maximum T5 length each pipeline asks for.
DEFAULTS = {
    "sd3": dict(steps=28, guidance_scale=7.0, t5_length=256),
    "flux": dict(steps=28, guidance_scale=3.5, t5_length=512),
}
TOKEN_MAPS = ("clip", "t5", "mean")
TEXT_SOFTMAX = ("text", "joint")
#: The grid side A&E's maps have on SD 1.x at 512 px: ``attention_res=16`` pools every family's maps to it.
COMPARISON_GRID = 16
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.attn$")


def is_mmdit(pipe) -> bool:
    """Whether ``pipe`` denoises with a transformer (SD 3, FLUX) rather than a UNet."""
    return getattr(pipe, "transformer", None) is not None and getattr(pipe, "unet", None) is None


def family(pipe) -> str:
    """``"flux"`` (``FluxTransformer2DModel``) or ``"sd3"`` (``SD3Transformer2DModel``)."""
    return "flux" if "Flux" in type(pipe.transformer).__name__ else "sd3"


def native_size(pipe) -> int:
    """The image side of the pipeline's own default: SD 3 ``sample_size × vae_scale``, FLUX ``default_sample_size × vae_scale``."""
    if family(pipe) == "flux":
        return int(getattr(pipe, "default_sample_size", 128)) * pipe.vae_scale_factor
    return int(pipe.transformer.config.sample_size) * pipe.vae_scale_factor


def multiple(pipe) -> int:
    """Image sides must be multiples of this: the VAE's down-sampling times the patch (FLUX: its 2×2 packing)."""
    patch = 2 if family(pipe) == "flux" else pipe.transformer.config.patch_size
    return pipe.vae_scale_factor * patch


def grid(pipe, height: int, width: int) -> tuple[int, int]:
    """The image-token grid ``(h, w)`` at ``height`` × ``width`` pixels (H/16 × W/16 on the real models)."""
    step = multiple(pipe)
    return height // step, width // step


def latent_shape(pipe, height: int, width: int) -> tuple[int, int, int, int]:
    """One seed's noise, as the pipeline's ``prepare_latents`` draws it (before FLUX's packing)."""
    scale = pipe.vae_scale_factor
    if family(pipe) == "flux":
        return (1, pipe.transformer.config.in_channels // 4, 2 * (height // (scale * 2)), 2 * (width // (scale * 2)))
    return (1, pipe.transformer.config.in_channels, height // scale, width // scale)


def blocks(pipe, height: int, width: int) -> list[Layer]:
    """Every joint-attention block in execution order (FLUX: double-stream, then single-stream), on its grid."""
    shape, kind = grid(pipe, height, width), family(pipe)
    found = []
    for key in pipe.transformer.attn_processors:
        name = key.removesuffix(".processor")
        match = _BLOCK.match(name)
        if match:
            place = "joint" if kind == "sd3" else "double" if match.group(1) == "transformer_blocks" else "single"
            found.append(Layer(name, place, shape))
    return sorted(found, key=Layer.sort_key)


def execution_key(name: str) -> tuple:
    """Sort key of a block path in the order the transformer runs it (FLUX: double-stream, then single-stream)."""
    match = _BLOCK.match(name)
    if match is None:
        raise AnelabError(f"{name!r} is neither a UNet attention layer nor a transformer block")
    return (int(match.group(1) == "single_transformer_blocks"), int(match.group(2)), 0, 0, 0)


def default_blocks(pipe, every: list[Layer]) -> list[Layer]:
    """SD 3: every joint block (as gsn-factory and FOCUS read); FLUX: the double-stream blocks (FOCUS), whose text
    tokens are still the text's own."""
    if family(pipe) == "flux":
        return [b for b in every if b.place == "double"]
    return list(every)


def choose_blocks(pipe, every: list[Layer], chosen) -> list[Layer]:
    """The blocks ``chosen`` names: None (:func:`default_blocks`), or a list of indices into :func:`blocks`' order,
    ``"a-b"`` ranges (inclusive) and block names; a one-line error names what exists."""
    if chosen is None:
        return default_blocks(pipe, every)
    items = [chosen] if isinstance(chosen, (int, str)) else list(chosen)
    names = [b.name for b in every]
    picked: list[Layer] = []

    def fail(item):
        raise AnelabError(
            f"block {item!r} does not exist: this model has {len(every)} blocks, indices 0..{len(every) - 1} "
            f"({names[0]} … {names[-1]}), as an index, an 'a-b' range or a name"
        )

    for item in items:
        if isinstance(item, bool):
            fail(item)
        if isinstance(item, int) or (isinstance(item, str) and item.strip().isdigit()):
            index = int(item)
            if not 0 <= index < len(every):
                fail(item)
            picked.append(every[index])
        elif isinstance(item, str) and re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", item):
            a, b = (int(x) for x in item.split("-"))
            if not (0 <= a <= b < len(every)):
                fail(item)
            picked.extend(every[a : b + 1])
        elif isinstance(item, str) and item.removesuffix(".processor") in names:
            picked.append(every[names.index(item.removesuffix(".processor"))])
        else:
            fail(item)
    unique = list(dict.fromkeys(picked))
    if len(unique) != len(picked):
        raise AnelabError(f"blocks {items!r} name a block twice")
    return sorted(unique, key=Layer.sort_key)


def read_grid(pipe, res: int, height: int, width: int, what: str = "attention_res") -> tuple[int, int]:
    """The grid the maps are read on for a method's ``attention_res``: native, or pooled to 16 on the width."""
    native = grid(pipe, height, width)
    if res == native[1]:
        return native
    if res == COMPARISON_GRID and native[1] > COMPARISON_GRID and native[1] % COMPARISON_GRID == 0:
        return (native[0] * COMPARISON_GRID // native[1], COMPARISON_GRID)
    allowed = sorted({native[1], COMPARISON_GRID} if native[1] % COMPARISON_GRID == 0 else {native[1]})
    raise AnelabError(
        f"{what} {res}: a transformer has no attention resolutions, every block has one {native[0]}x{native[1]} "
        f"image-token grid at {height}x{width} px; {what} may be {allowed} (the native grid or 16, pooled), "
        "and blocks= chooses where to read"
    )


# -- tokens --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TextColumns:
    """How the joint attention's text keys become CLIP token columns: ``matrix`` ``[text keys, 77]``."""

    matrix: torch.Tensor
    text_length: int  # text keys in the joint attention (SD 3: 77 + T5 length; FLUX: T5 length)
    token_maps: str

    @classmethod
    def of(cls, pipe, prompt: str, token_maps: str | None, t5_length: int) -> "TextColumns":
        kind = family(pipe)
        token_maps = token_maps or ("t5" if kind == "flux" else "mean")
        if token_maps not in TOKEN_MAPS:
            raise AnelabError(f"token_maps must be one of {TOKEN_MAPS}, got {token_maps!r}")
        if kind == "flux" and token_maps != "t5":
            raise AnelabError(
                f"token_maps={token_maps!r}: FLUX attends to T5 tokens only (its CLIP gives the pooled vector); use 't5'"
            )
        clip = pipe.tokenizer
        t5 = pipe.tokenizer_2 if kind == "flux" else pipe.tokenizer_3
        offset = 0 if kind == "flux" else clip.model_max_length
        if t5 is None or (kind == "sd3" and pipe.text_encoder_3 is None):
            if token_maps != "clip":
                raise AnelabError(
                    f"token_maps={token_maps!r} needs the T5 encoder; this pipeline has none (use 'clip')"
                )
            t5_spans = []
        else:
            t5_spans = t5(prompt, max_length=t5_length, truncation=False, return_offsets_mapping=True)
        clip_enc = clip(prompt, return_offsets_mapping=True)
        ids, spans = clip_enc["input_ids"], clip_enc["offset_mapping"]
        eot = len(ids) - 1
        length = offset + t5_length  # SD 3 without T5: zeros in its place (the pipeline's)
        matrix = torch.zeros(length, clip.model_max_length, dtype=torch.float64)
        for p in range(min(eot + 1, clip.model_max_length)):
            if token_maps in ("clip", "mean"):
                matrix[p, p] += 1.0 if token_maps == "clip" else 0.5
            if token_maps == "clip":
                continue
            if p == 0:
                continue  # <sot>: T5 has none
            if p == eot:
                pieces = [q for q, i in enumerate(t5_spans["input_ids"]) if i == t5.eos_token_id][:1]
            else:
                a, b = spans[p]
                pieces = [q for q, (c, d) in enumerate(t5_spans["offset_mapping"]) if c < b and a < d and d > c]
            if not pieces:
                continue
            if max(pieces) >= t5_length:
                raise AnelabError(
                    f"token {p} of {prompt!r} is at T5 position {max(pieces)}, beyond the T5 length {t5_length} "
                    f"(positions 0..{t5_length - 1}); shorten the prompt or raise max_sequence_length"
                )
            weight = 1.0 if token_maps == "t5" else 0.5
            for q in pieces:
                matrix[offset + q, p] += weight
        return cls(matrix, length, token_maps)


# -- capture -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Reading:
    """What a :class:`JointCapture` needs besides its block: the family, the text columns, the softmax, the grids."""

    family: str
    columns: TextColumns
    text_softmax: str
    native: tuple[int, int]
    read: tuple[int, int]

    def key(self) -> tuple:
        """What a CUDA graph captured through these processors holds as constants (:mod:`anelab.fast`): a graph is
        valid only for the same key (another prompt may map its words to other T5 keys)."""
        digest = hashlib.sha256(self.columns.matrix.numpy().tobytes()).hexdigest()
        return (self.family, self.text_softmax, self.native, self.read, self.columns.text_length, digest)


class JointCapture:
    """Attention processor of one joint-attention block: image-query × text-key probabilities for a sink (as CLIP
    token columns, on the read grid, ``[B, heads, h·w, 77]``), the block's own processor for its output."""

    def __init__(self, name: str, hooks, fallback, reading: Reading):
        self.name, self.hooks, self.fallback, self.reading = name, hooks, fallback, reading

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        extra = {} if image_rotary_emb is None else {"image_rotary_emb": image_rotary_emb}
        sink = self.hooks.sinks.get(self.name)
        if sink is None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, **extra)
        rows = self.hooks.observe if self.hooks.observe is not None else slice(None)
        probs = self.probs(
            attn,
            hidden_states[rows],
            None if encoder_hidden_states is None else encoder_hidden_states[rows],
            image_rotary_emb,
        )
        sink(self.name, probs)
        if self.name == self.hooks.stop_after and self.hooks.observe is None:
            raise StopForward
        return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, **extra)

    def probs(self, attn, hidden_states, encoder_hidden_states, rotary) -> torch.Tensor:
        r = self.reading
        heads = attn.heads
        if encoder_hidden_states is None:  # FLUX single-stream: [text, image] already joined
            text, image = hidden_states[:, : r.columns.text_length], hidden_states[:, r.columns.text_length :]
            q, k_text = attn.to_q(image), attn.to_k(text)
            k_image = attn.to_k(image) if r.text_softmax == "joint" else None
            norm_q, norm_text, norm_image = attn.norm_q, attn.norm_k, attn.norm_k
        else:
            q, k_text = attn.to_q(hidden_states), attn.add_k_proj(encoder_hidden_states)
            k_image = attn.to_k(hidden_states) if r.text_softmax == "joint" else None
            norm_q, norm_text, norm_image = attn.norm_q, attn.norm_added_k, attn.norm_k
        split = lambda x: x.unflatten(-1, (heads, -1))  # noqa: E731  [B, n, heads, d]
        q, k_text = split(q), split(k_text)
        k_image = None if k_image is None else split(k_image)
        if r.family == "sd3":  # JointAttnProcessor2_0 normalises in [B, heads, n, d]
            q, k_text = q.transpose(1, 2), k_text.transpose(1, 2)
            k_image = None if k_image is None else k_image.transpose(1, 2)
            q, k_text = _norm(norm_q, q), _norm(norm_text, k_text)
            k_image = None if k_image is None else _norm(norm_image, k_image)
        else:  # FluxAttnProcessor normalises in [B, n, heads, d], then RoPE over [text, image]
            q, k_text = _norm(norm_q, q), _norm(norm_text, k_text)
            k_image = None if k_image is None else _norm(norm_image, k_image)
            if rotary is not None:
                from diffusers.models.embeddings import apply_rotary_emb

                n = r.columns.text_length
                text_rope, image_rope = (tuple(c[:n] for c in rotary), tuple(c[n:] for c in rotary))
                q = apply_rotary_emb(q, image_rope, sequence_dim=1)
                k_text = apply_rotary_emb(k_text, text_rope, sequence_dim=1)
                k_image = None if k_image is None else apply_rotary_emb(k_image, image_rope, sequence_dim=1)
            q, k_text = q.transpose(1, 2), k_text.transpose(1, 2)
            k_image = None if k_image is None else k_image.transpose(1, 2)
        wide = torch.promote_types(q.dtype, torch.float32)
        scale = q.shape[-1] ** -0.5
        scores = (q.to(wide) @ k_text.to(wide).transpose(-1, -2)) * scale  # [B, heads, n_img, text]
        if k_image is None:
            probs = scores.softmax(dim=-1)
        else:
            image_scores = (q.to(wide) @ k_image.to(wide).transpose(-1, -2)) * scale
            probs = torch.cat([image_scores, scores], dim=-1).softmax(dim=-1)[..., image_scores.shape[-1] :]
        columns = probs @ r.columns.matrix.to(probs)  # [B, heads, n_img, 77]
        if r.read != r.native:
            b, h, _, s = columns.shape
            grid_maps = columns.transpose(-1, -2).reshape(b * h, s, *r.native)
            pooled = torch.nn.functional.adaptive_avg_pool2d(grid_maps, r.read)
            columns = pooled.reshape(b, h, s, -1).transpose(-1, -2)
        return columns


def _norm(norm, x):
    return x if norm is None else norm(x)


# -- conditioning, the forward, the schedule, decoding ----------------------------------------------
@dataclasses.dataclass
class JointConditioning:
    """What the transformer takes besides latent and timestep, for one prompt (the pipeline's ``encode_prompt``):
    text tokens ``[1, T, D]``, the pooled vector, and for FLUX the guidance embedding's value and the position ids."""

    cond: torch.Tensor
    uncond: torch.Tensor | None
    pooled: torch.Tensor
    pooled_uncond: torch.Tensor | None
    extra: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def encode(
        cls,
        pipe,
        prompt: str,
        *,
        height: int,
        width: int,
        cfg: bool,
        guidance_scale: float,
        t5_length: int,
        device,
        dtype,
    ):
        if family(pipe) == "sd3":
            cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(
                prompt=prompt,
                prompt_2=None,
                prompt_3=None,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=cfg,
                max_sequence_length=t5_length,
            )
            return cls(
                cond.to(dtype),
                None if uncond is None else uncond.to(dtype),
                pooled.to(dtype),
                None if pooled_uncond is None else pooled_uncond.to(dtype),
            )
        cond, pooled, text_ids = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device=device, num_images_per_prompt=1, max_sequence_length=t5_length
        )
        h, w = grid(pipe, height, width)
        image_ids = pipe._prepare_latent_image_ids(1, h, w, device, dtype)
        extra = {"txt_ids": text_ids, "img_ids": image_ids}
        if pipe.transformer.config.guidance_embeds:
            extra["guidance"] = torch.full([1], guidance_scale, device=device, dtype=torch.float32)
        return cls(cond.to(dtype), None, pooled.to(dtype), None, extra)

    def unet_kwargs(self, n: int, cfg: bool) -> dict:
        """Keyword arguments of a :class:`Denoiser` forward on ``n`` latents (``cfg``: unconditional rows first)."""

        def rows(cond, uncond):
            cond = cond.expand(n, *cond.shape[1:])
            return torch.cat([uncond.expand(n, *uncond.shape[1:]), cond]) if cfg else cond

        kwargs = {
            "encoder_hidden_states": rows(self.cond, self.uncond),
            "pooled_projections": rows(self.pooled, self.pooled_uncond),
        }
        for key, value in self.extra.items():
            kwargs[key] = value.expand(n * (2 if cfg else 1)) if key == "guidance" else value
        return kwargs


class Denoiser(torch.nn.Module):
    """The transformer as the sampler calls a UNet: ``(x [B, C, h, w], t, **kwargs) → .sample [B, C, h, w]``, with
    the pipeline's timestep convention (FLUX: ``t/1000`` and the 2×2 packing) and the transformer's processors."""

    def __init__(self, pipe):
        super().__init__()
        self.transformer, self.family, self.vae_scale = pipe.transformer, family(pipe), pipe.vae_scale_factor
        self.pack, self.unpack = (
            getattr(type(pipe), "_pack_latents", None),
            getattr(type(pipe), "_unpack_latents", None),
        )

    @property
    def device(self):
        return self.transformer.device

    @property
    def dtype(self):
        return self.transformer.dtype

    @property
    def config(self):
        return self.transformer.config

    @property
    def attn_processors(self):
        return self.transformer.attn_processors

    def set_attn_processor(self, processors):
        self.transformer.set_attn_processor(processors)

    def forward(self, x: torch.Tensor, t, **kwargs):
        batch = len(x)
        if self.family == "sd3":
            out = self.transformer(hidden_states=x, timestep=t.expand(batch), return_dict=False, **kwargs)[0]
            return SimpleNamespace(sample=out)
        _, c, h, w = x.shape
        packed = self.pack(x, batch, c, h, w)
        timestep = t.expand(batch).to(x.dtype)
        out = self.transformer(hidden_states=packed, timestep=timestep / 1000, return_dict=False, **kwargs)[0]
        return SimpleNamespace(sample=self.unpack(out, h * self.vae_scale, w * self.vae_scale, self.vae_scale))


_DENOISERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def denoiser(pipe) -> Denoiser:
    """One :class:`Denoiser` per transformer (a CUDA graph or hook registry keyed by it stays valid)."""
    found = _DENOISERS.get(pipe.transformer)
    if found is None:
        found = _DENOISERS[pipe.transformer] = Denoiser(pipe)
    return found


def set_timesteps(pipe, scheduler, steps: int, height: int, width: int, device=None) -> None:
    """The pipeline's own schedule: SD 3 ``set_timesteps(steps)`` (``mu`` from the token count when the scheduler
    shifts dynamically, as SD 3.5's pipeline does), FLUX its sigmas ``linspace(1, 1/steps, steps)`` and ``mu``."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = scheduler.config
    h, w = grid(pipe, height, width)
    mu = None
    if config.get("use_dynamic_shifting", False):
        mu = calculate_shift(
            h * w,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15 if family(pipe) == "flux" else 1.16),
        )
    options = {} if mu is None else {"mu": mu}
    if family(pipe) == "flux" and not config.get("use_flow_sigmas", False):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, **options)
    else:
        scheduler.set_timesteps(steps, device=device, **options)


def sigma_placement(pipe, steps: int, height: int, width: int):
    """``place(i) -> j``: loop index ``i`` of SD 1.x's 50-step schedule (where A&E's thresholds and update range are
    written) → the step ``j`` of this flow-matching schedule whose σ is nearest the one of equal signal-to-noise ratio,
    σ = 1 / (1 + √(ᾱ_t / (1 − ᾱ_t))) (reference §2: A&E's steps 0/10/20/25 sit at σ ≈ 0.93/0.82/0.68/0.60)."""
    from diffusers import PNDMScheduler

    from .stand_ins import SD14_PNDM_CONFIG

    sd = PNDMScheduler.from_config(SD14_PNDM_CONFIG)
    sd.set_timesteps(50)
    abar = sd.alphas_cumprod[sd.timesteps].double()
    matched = 1 / (1 + (abar / (1 - abar)).sqrt())
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    set_timesteps(pipe, scheduler, steps, height, width)
    sigmas = scheduler.sigmas[:steps].double()

    def place(i: int) -> int:
        if i >= len(matched):
            return steps
        return int((sigmas - matched[i]).abs().argmin())

    return place


def decode(pipe, latents: torch.Tensor, output_type: str):
    """The pipeline's decode: ``latents / scaling_factor + shift_factor`` through the VAE, then its post-processing."""
    vae = pipe.vae
    latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)
