"""What differs between Stable Diffusion 1.x, 2.x and SDXL, in one place: the model family, its native
image side and cross-attention resolutions, the softmax columns of its token re-normalisation, and what
its UNet takes besides the latent and the timestep (:class:`Conditioning`).

- **SD 1.x** (``CompVis/stable-diffusion-v1-4``): one CLIP text encoder, a tokenizer padding with
  ``<|endoftext|>``, cross-attention at every level (64/32/16 and the mid block's 8 at 512 px).
- **SD 2.x** (``stabilityai/stable-diffusion-2-1`` 768 px v-prediction, ``-2-1-base`` 512 px): the SD 1.x
  layout with an OpenCLIP text encoder whose tokenizer pads with ``!`` (reference §1.3).
- **SDXL** (``stabilityai/stable-diffusion-xl-base-1.0``, 1024 px): two text encoders whose hidden states are
  concatenated, no cross-attention at the highest-resolution level (64 and 32 at 1024 px, the mid block at
  32), several transformer layers per attention, and added conditioning: the second encoder's pooled
  projection and the size/crop ``time_ids`` (``addition_embed_type="text_time"``).

Token positions are those of ``pipe.tokenizer`` (SDXL: the first encoder's). SDXL's two tokenizers share
CLIP's byte-level BPE, so a prompt's positions are the same in both; :func:`check_tokenizers` checks it.
"""

from __future__ import annotations

import dataclasses

import torch

from . import mmdit
from .errors import AnelabError
from .hooks import cross_attention_layers
from .loading import load_or_explain, load_parts
from .stand_ins import TINY_MODELS, tiny_model
from .tokens import prompt_ids

FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux")
#: What ``generate`` uses when steps or guidance scale are not given: each family's own diffusers pipeline's defaults
#: (``StableDiffusionPipeline`` 50 / 7.5, ``StableDiffusionXLPipeline`` 50 / 5.0, SD 3 28 / 7.0, FLUX 28 / 3.5).
DEFAULTS = {"sd1": (50, 7.5), "sd2": (50, 7.5), "sdxl": (50, 5.0)} | {
    name: (d["steps"], d["guidance_scale"]) for name, d in mmdit.DEFAULTS.items()
}
#: The image side the built-in studies are written for (SD 1.x's native side).
SD1_SIZE = 512


def family(pipe) -> str:
    """``"sd3"`` or ``"flux"`` (a transformer, :mod:`anelab.mmdit`), ``"sdxl"`` (added text/time conditioning), ``"sd2"``
    (a tokenizer padding with something other than ``<|endoftext|>``, SD 2's ``!``) or ``"sd1"``."""
    if mmdit.is_mmdit(pipe):
        return mmdit.family(pipe)
    if getattr(pipe.unet.config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    return "sd2" if pads_with_bang(pipe.tokenizer) else "sd1"


def pads_with_bang(tokenizer) -> bool:
    """Whether the tokenizer pads with a token other than ``<|endoftext|>`` (SD 2, SDXL's second tokenizer)."""
    return tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token


def tokenizers(pipe) -> list:
    """The pipeline's CLIP tokenizers (SDXL and SD 3: two; a T5 tokenizer is :mod:`anelab.mmdit`'s)."""
    found = (pipe.tokenizer, getattr(pipe, "tokenizer_2", None))
    return [t for t in found if t is not None and "T5" not in type(t).__name__]


def native_size(pipe_or_unet, vae_scale: int | None = None) -> int:
    """The image side the model was trained at: ``unet.config.sample_size`` × the VAE's down-sampling
    (SD 1.x and 2.1-base 512, SD 2.1 768, SDXL 1024; SD 3 and FLUX: :func:`anelab.mmdit.native_size`)."""
    if mmdit.is_mmdit(pipe_or_unet):
        return mmdit.native_size(pipe_or_unet)
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    scale = vae_scale or getattr(pipe_or_unet, "vae_scale_factor", 8)
    size = unet.config.sample_size
    return int(size if isinstance(size, int) else size[0]) * scale


def attention_resolutions(pipe, height: int | None = None, width: int | None = None) -> list[int]:
    """The cross-attention resolutions (attention-map sides, the width for non-square images) the model has at
    ``height`` × ``width`` (default: its native size), sorted: what ``GuidanceConfig.attention_res`` and
    ``Record.resolutions`` accept. SD 1.x at 512 px: ``[8, 16, 32, 64]``; SDXL at 1024 px: ``[32, 64]``."""

    scale = getattr(pipe, "vae_scale_factor", 8)
    side = native_size(pipe)
    height, width = height or side, width or side
    return sorted({layer.res for layer in cross_attention_layers(pipe.unet, height // scale, width // scale)})


def softmax_tokens(pipe, mode: str) -> str:
    """The columns of the token softmax a ``GuidanceConfig.softmax_tokens`` means on this model (reference §1.3).

    ``"legacy"`` is the official code's choice for the model: on SD 1.x positions 1..75 (the prompt, ``<eot>``
    and its ``<eot>`` padding); on a model whose tokenizer pads with ``!`` — SD 2.x, and SDXL, whose second
    encoder's half of every padding key is a ``!`` — the official SD 2.1 switch, the prompt's own tokens
    (``"prompt"``). ``"prompt"`` and ``"padded"`` (1..75) mean the same on every model."""
    if mode == "legacy" and mmdit.is_mmdit(pipe):  # T5 has no padding columns in CLIP's places: the prompt's own
        return "prompt"
    if mode == "legacy" and any(pads_with_bang(t) for t in tokenizers(pipe)):
        return "prompt"
    return mode


def check_tokenizers(pipe, prompt: str) -> None:
    """SDXL, SD 3: the two CLIP tokenizers must split ``prompt`` alike, since guidance reads the positions of the first."""

    first, *others = tokenizers(pipe)
    ids = prompt_ids(first, prompt)
    for other in others:
        if prompt_ids(other, prompt) != ids:
            raise AnelabError(
                f"the pipeline's tokenizers split {prompt!r} differently; guidance reads the first tokenizer's positions "
                "and needs both encoders' tokens at the same positions"
            )


def scaled_resolution(pipe, res: int = 16, width: int | None = None) -> int:
    """``res`` written for SD 1.x at 512 px as the same fraction of the image on this model at ``width`` (default:
    native): the A&E default 16 is 16 on SD 1.x, 24 on SD 2.1 at 768 px, 32 on SDXL at 1024 px. (Whether the
    model has it there is :func:`attention_resolutions`' answer.)"""
    return int(round(res * (width or native_size(pipe)) / SD1_SIZE))


@dataclasses.dataclass
class Conditioning:
    """What the UNet takes besides the latent and the timestep, for one prompt: the text embeddings
    ``[1, 77, D]`` (conditional and, with CFG, unconditional) and SDXL's added conditioning
    (``text_embeds`` pooled ``[1, P]``, ``time_ids`` ``[1, 6]``). The sampler asks it for a forward's keyword
    arguments (:meth:`unet_kwargs`); rows are expanded to the batch, unconditional rows first with CFG."""

    cond: torch.Tensor
    uncond: torch.Tensor | None = None
    added: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # conditional rows
    added_uncond: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @classmethod
    def encode(cls, pipe, prompt: str, *, height: int, width: int, cfg: bool, device, dtype) -> "Conditioning":
        """Encode ``prompt`` as the model's own diffusers pipeline does (``encode_prompt``; SDXL: both encoders,
        pooled embeddings, zeros for the empty negative prompt when ``force_zeros_for_empty_prompt``, and
        ``time_ids`` = original size, crop top-left (0, 0), target size, all (height, width))."""
        if family(pipe) != "sdxl":
            cond, uncond = pipe.encode_prompt(prompt, device, 1, cfg)
            return cls(cond.to(dtype), None if uncond is None else uncond.to(dtype))
        cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=cfg
        )
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)
        expected = pipe.unet.add_embedding.linear_1.in_features
        given = pipe.unet.config.addition_time_embed_dim * time_ids.shape[1] + pooled.shape[-1]
        if given != expected:
            raise AnelabError(
                f"the UNet expects added conditioning of width {expected}, the text encoder and time ids give {given}"
            )
        added = {"text_embeds": pooled.to(device, dtype), "time_ids": time_ids}
        added_uncond = {} if uncond is None else {"text_embeds": pooled_uncond.to(device, dtype), "time_ids": time_ids}
        return cls(cond.to(dtype), None if uncond is None else uncond.to(dtype), added, added_uncond)

    def unet_kwargs(self, n: int, cfg: bool) -> dict:
        """Keyword arguments of a UNet forward on ``n`` latents (``cfg``: ``2n``, unconditional rows then conditional)."""

        def rows(cond, uncond):
            cond = cond.expand(n, *cond.shape[1:])
            return torch.cat([uncond.expand(n, *uncond.shape[1:]), cond]) if cfg else cond

        kwargs = {"encoder_hidden_states": rows(self.cond, self.uncond)}
        if self.added:
            kwargs["added_cond_kwargs"] = {k: rows(v, self.added_uncond.get(k)) for k, v in self.added.items()}
        return kwargs


#: Why a study, a sweep or a report refuses SD 3 / FLUX (one line).
TRANSFORMER_STUDIES = (
    "the studies and reports run SD 1.x, 2.x and SDXL; {kind} is a transformer, which anelab.generate, "
    "anelab generate and anelab bench run (reports on transformers are not built yet)"
)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What a study needs of a model before running it: its family, native side and UNet (weights, or a
    shapes-only copy on the meta device), hence its cross-attention resolutions at any side."""

    family: str
    native: int
    unet: torch.nn.Module
    vae_scale: int = 8

    def resolutions(self, side: int) -> list[int]:
        """Cross-attention resolutions at ``side`` × ``side`` pixels, sorted."""

        return sorted(
            {layer.res for layer in cross_attention_layers(self.unet, side // self.vae_scale, side // self.vae_scale)}
        )

    @classmethod
    def of(cls, pipe) -> "Architecture":
        if mmdit.is_mmdit(pipe):
            raise AnelabError(TRANSFORMER_STUDIES.format(kind=mmdit.family(pipe)))
        return cls(family(pipe), native_size(pipe), pipe.unet, getattr(pipe, "vae_scale_factor", 8))


def transformer_family(model, revision: str | None = None) -> str | None:
    """``"sd3"`` / ``"flux"`` when ``model`` (a built pipeline, a stand-in's name, a directory or a Hub id, read from its
    ``model_index.json`` where it can be) is a transformer, else None; nothing is loaded."""
    import os

    if not isinstance(model, (str, os.PathLike)):
        return mmdit.family(model) if mmdit.is_mmdit(model) else None
    from .loading import PIPELINE_CLASSES, pipeline_class

    kind = {"tiny-sd3": "sd3", "tiny-flux": "flux"}.get(str(model))
    if kind is None and str(model) not in TINY_MODELS:
        kind = PIPELINE_CLASSES.get(
            pipeline_class(str(model), {} if revision is None else {"revision": revision}).__name__
        )
    return kind if kind in mmdit.FAMILIES else None


def refuse_transformer(model, revision: str | None = None) -> None:
    """A one-line error when ``model`` is SD 3 or FLUX (:func:`transformer_family`), whose studies are not built yet."""
    kind = transformer_family(model, revision)
    if kind is not None:
        raise AnelabError(TRANSFORMER_STUDIES.format(kind=kind))


def architecture(model, revision: str | None = None, **hub_options) -> Architecture:
    """The :class:`Architecture` of a built pipeline, an offline stand-in, a Hub id or a local directory (for
    the last two only the tokenizer and the UNet and VAE configurations are read; the UNet is built on the
    meta device, without weights)."""
    import os

    if not isinstance(model, (str, os.PathLike)):
        return Architecture.of(model)

    if str(model) in TINY_MODELS:
        return Architecture.of(tiny_model(str(model)))
    from diffusers import AutoencoderKL, UNet2DConditionModel

    tokenizer, _ = load_parts(model, revision=revision, **hub_options)
    options = {k: v for k, v in dict(revision=revision, **hub_options).items() if v is not None and k != "variant"}

    def load(path):
        unet_config = UNet2DConditionModel.load_config(path, subfolder="unet", **options)
        vae_config = AutoencoderKL.load_config(path, subfolder="vae", **options)
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_config)
        return unet, 2 ** (len(vae_config.get("block_out_channels", (0,) * 4)) - 1)

    from .loading import PIPELINE_CLASSES, pipeline_class

    kind = PIPELINE_CLASSES.get(pipeline_class(str(model), options).__name__)
    if kind in mmdit.FAMILIES:
        raise AnelabError(TRANSFORMER_STUDIES.format(kind=kind))
    unet, vae_scale = load_or_explain("diffusers pipeline", str(model), "model_index.json", load)
    name = "sdxl" if unet.config.addition_embed_type == "text_time" else "sd2" if pads_with_bang(tokenizer) else "sd1"
    return Architecture(name, native_size(unet, vae_scale), unet, vae_scale)
