"""The UNet family adapter (SD 1.x, 2.x, XL): what a UNet's attention layers are called, where they sit and on which
grid they attend, the latents it denoises and how they are decoded. Nothing else in the package parses a UNet's module
paths or walks its ``down_blocks``; what each UNet family takes as conditioning is :mod:`anelab.models`'; the
transformers' counterpart of both is :mod:`anelab.mmdit`.

Layer names are diffusers module paths minus ``.processor``
(``up_blocks.1.attentions.0.transformer_blocks.0.attn2``); ``place`` is ``down``, ``mid`` or ``up``.
"""

from __future__ import annotations

import math
import re

import torch

NAME = re.compile(
    r"^(down_blocks|mid_block|up_blocks)\.?(\d*)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn([12])$"
)
PLACES = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}
ORDER = ("down", "mid", "up")  # execution order of the places


def place(name: str) -> str | None:
    """``down`` / ``mid`` / ``up`` of a UNet layer path, None for a path of another shape."""
    match = NAME.match(name)
    return None if match is None else PLACES[match.group(1)]


def execution_key(name: str) -> tuple | None:
    """Sort key of a layer path in the order the UNet runs it (attn1 before attn2), None for another shape."""
    match = NAME.match(name)
    if match is None:
        return None
    block, attention, transformer, which = (int(x or 0) for x in match.groups()[1:])
    return (ORDER.index(PLACES[match.group(1)]), block, attention, transformer, which)


def attention_layers(unet, latent_height: int, latent_width: int, cross: bool = True) -> list[tuple[str, str, tuple]]:
    """``(name, place, (h, w))`` of the cross-attention (``attn2``) or self-attention (``attn1``) layers of a
    ``UNet2DConditionModel``, in execution order, with the grid each attends on at this latent size."""
    sizes, (h, w) = [], (latent_height, latent_width)
    for block in unet.down_blocks:
        sizes.append((h, w))
        if getattr(block, "downsamplers", None):
            h, w = math.ceil(h / 2), math.ceil(w / 2)  # stride-2 conv, padding 1
    n = len(sizes)
    layers = []
    for key in unet.attn_processors:
        name = key.removesuffix(".processor")
        match = NAME.match(name)
        if not match or getattr(unet.get_submodule(name), "is_cross_attention", False) != cross:
            continue
        kind, block = match.group(1), int(match.group(2) or 0)
        shape = (h, w) if kind == "mid_block" else sizes[block] if kind == "down_blocks" else sizes[n - 1 - block]
        layers.append((name, PLACES[kind], shape))
    return sorted(layers, key=lambda layer: execution_key(layer[0]))


def short_name(name: str) -> str:
    """``up_blocks.1.attentions.0.transformer_blocks.0.attn2`` → ``up 1.0``; ``mid_block…`` → ``mid``
    (a transformer block other than 0 adds `` t<k>``); a name of another shape is returned as is."""
    match = NAME.match(name)
    if not match or match.group(5) != "2":
        return name
    kind, block, attention, transformer = match.groups()[:4]
    short = (
        f"mid{f' {attention}' if attention != '0' else ''}"
        if kind == "mid_block"
        else f"{kind.split('_')[0]} {block}.{attention}"
    )
    return short + (f" t{transformer}" if transformer != "0" else "")


def latent_shape(pipe, height: int, width: int) -> tuple[int, int, int, int]:
    """One seed's noise, as the pipeline's ``prepare_latents`` draws it: ``[1, C, H/8, W/8]``."""
    scale = getattr(pipe, "vae_scale_factor", 8)
    return (1, pipe.unet.config.in_channels, height // scale, width // scale)


def decode(pipe, latents: torch.Tensor, output_type: str):
    """The VAE decode of the model's own pipeline (with the latents mean/std when the VAE config has them, as SDXL's
    pipeline does), then its post-processing."""
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
