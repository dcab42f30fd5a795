"""Offline, randomly initialised stand-ins for the real models (seconds on a CPU, no download).

``tiny_pipeline()`` (``"tiny"``) is an SD-1.x-shaped ``StableDiffusionPipeline``: cross-attention in three down
blocks, the mid block and three up blocks (at 512 px: 64, 32, 16 and 8), a small VAE with SD's ×8
down-sampling, a small CLIP text encoder, SD-1.4's PNDM scheduler configuration and a CLIP-style
BPE tokenizer over ``assets/tiny_vocab.txt``. ``tiny_sd2_pipeline()`` (``"tiny-sd2"``) and
``tiny_xl_pipeline()`` (``"tiny-xl"``) do the same for SD 2.x and SDXL (:mod:`anelab.models`); all three
are 512 px models by default. ``tiny_sd3_pipeline()`` (``"tiny-sd3"``) and ``tiny_flux_pipeline()`` (``"tiny-flux"``)
are the MMDiT transformers (:mod:`anelab.mmdit`), 256 px by default, with a T5 encoder and a T5 tokenizer made
offline from the same vocabulary. Numbers they produce are meaningless; they exist to run every code path
end to end.
"""

from __future__ import annotations

import functools
from importlib import resources

import torch

#: SD-1.4's scheduler configuration (scheduler/scheduler_config.json of CompVis/stable-diffusion-v1-4).
SD14_PNDM_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    skip_prk_steps=True,
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
    trained_betas=None,
)

#: Bumped whenever the tiny models change, so run-store keys of their images change too.
TINY_VERSION = "1"
#: The offline stand-ins :func:`anelab.load_pipeline` builds by name, with the version in their run-store identity.
TINY_MODELS = {"tiny": TINY_VERSION, "tiny-sd2": "1", "tiny-xl": "1", "tiny-sd3": "1", "tiny-flux": "1"}

#: Cross-attention query/key weights are multiplied by this after random initialisation, so that
#: attention is peaked enough for the A&E loss to respond to the latent (plain random init gives
#: near-uniform attention: loss ≈ 0.985, and no step moves it).
CROSS_ATTENTION_GAIN = 6.0

SOT, EOT = "<|startoftext|>", "<|endoftext|>"


def vocabulary_words() -> list[str]:
    text = resources.files("anelab").joinpath("assets/tiny_vocab.txt").read_text()
    lines = (line.split("#")[0] for line in text.splitlines())
    return sorted({word for line in lines for word in line.split()})


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style byte-level BPE vocabulary in which every vocabulary word is a single token."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    base = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in vocabulary_words():  # left-to-right prefix merges: c·a → ca, ca·t</w> → cat</w>
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
    merges.sort(key=lambda pair: len(pair[0]))  # shorter prefixes first
    for _ in range(10):  # a merge of another word may fire first: add the joins that word then needs
        vocab = _vocab(base, merges)
        tokenizer = CLIPTokenizer(vocab=vocab, merges=list(merges))
        broken = 0
        for word in vocabulary_words():
            pieces = tokenizer.tokenize(word)
            while len(pieces) > 1:
                broken += 1
                merges.append((pieces[0], pieces[1]))
                pieces = [pieces[0] + pieces[1]] + pieces[2:]
        if not broken:
            return vocab, merges
    raise RuntimeError("could not build a tokenizer in which every vocabulary word is one token")


def _vocab(base: list[str], merges: list[tuple[str, str]]) -> dict[str, int]:
    tokens = list(dict.fromkeys(base + [a + b for a, b in merges] + [SOT, EOT]))
    return {token: i for i, token in enumerate(tokens)}


def tiny_tokenizer():
    """A ``CLIPTokenizer`` (77 positions, pads with ``<|endoftext|>`` like SD 1.x)."""
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=77)


def tiny_model(name: str):
    """The stand-in called ``name`` (:data:`TINY_MODELS`), built."""
    builders = {
        "tiny": tiny_pipeline,
        "tiny-sd2": tiny_sd2_pipeline,
        "tiny-xl": tiny_xl_pipeline,
        "tiny-sd3": tiny_sd3_pipeline,
        "tiny-flux": tiny_flux_pipeline,
    }
    return builders[name]()


def tiny_parts(name: str):
    """The tokenizer and scheduler of the stand-in ``name``, without building it."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, PNDMScheduler

    if name == "tiny-sd3":
        return tiny_tokenizer(), FlowMatchEulerDiscreteScheduler.from_config(SD3_FLOW_CONFIG)
    if name == "tiny-flux":
        return tiny_tokenizer(), FlowMatchEulerDiscreteScheduler.from_config(FLUX_FLOW_CONFIG)
    if name == "tiny-sd2":
        return tiny_tokenizer_bang(), DDIMScheduler.from_config(SD21_DDIM_CONFIG)
    if name == "tiny-xl":
        return tiny_tokenizer(), EulerDiscreteScheduler.from_config(SDXL_EULER_CONFIG)
    return tiny_tokenizer(), PNDMScheduler.from_config(SD14_PNDM_CONFIG)


def tiny_pipeline(seed: int = 0, cross_attention_gain: float = CROSS_ATTENTION_GAIN):
    """Random SD-1.x-shaped ``StableDiffusionPipeline`` on CPU, fp32, built offline."""
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=32,
            attention_head_dim=2,  # SD-1.x naming: number of heads
            norm_num_groups=8,
        )
        vae = _tiny_vae(scaling_factor=0.18215)
        text_encoder = CLIPTextModel(_text_config(tokenizer))
        _responsive(unet, cross_attention_gain)
    return _sd_pipeline(unet, vae, text_encoder, tokenizer, PNDMScheduler.from_config(SD14_PNDM_CONFIG))


#: Scheduler configurations of the real checkpoints (scheduler/scheduler_config.json on the Hub).
SD21_DDIM_CONFIG = dict(  # stabilityai/stable-diffusion-2-1 (768 px, v-prediction)
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    skip_prk_steps=True,
    trained_betas=None,
    prediction_type="v_prediction",
)
SDXL_EULER_CONFIG = dict(  # stabilityai/stable-diffusion-xl-base-1.0
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    interpolation_type="linear",
    prediction_type="epsilon",
    sample_max_value=1.0,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    timestep_spacing="leading",
    trained_betas=None,
    use_karras_sigmas=False,
    clip_sample=False,
)


def tiny_tokenizer_bang():
    """The tiny tokenizer padding with ``!`` (id 0 here as in OpenCLIP's vocabulary), like SD 2's tokenizer and SDXL's ``tokenizer_2``."""
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = "!"
    return tokenizer


def _tiny_vae(scaling_factor: float, force_upcast: bool = True):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def _sd_pipeline(unet, vae, text_encoder, tokenizer, scheduler):
    """A ``StableDiffusionPipeline`` of these parts in eval mode, without safety checker or progress bar."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _text_config(tokenizer, hidden_act: str = "quick_gelu", **overrides):
    from transformers import CLIPTextConfig

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **(sizes | overrides),
    )


def _responsive(unet, gain: float) -> None:
    """Scale every cross-attention's query and key weights by ``gain`` (see :data:`CROSS_ATTENTION_GAIN`)."""
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_q.weight.mul_(gain)
                module.to_k.weight.mul_(gain)


def tiny_sd2_pipeline(
    seed: int = 0,
    sample_size: int = 64,
    prediction_type: str = "v_prediction",
    cross_attention_gain: float = CROSS_ATTENTION_GAIN,
):
    """Random SD-2.x-shaped ``StableDiffusionPipeline`` on CPU, fp32, built offline (``"tiny-sd2"``).

    SD 2's differences from SD 1.x, scaled down: an OpenCLIP-style text encoder (``gelu``, a projection),
    ``attention_head_dim`` per block, linear projections in the transformers, a tokenizer padding with
    ``!``; with ``prediction_type="v_prediction"`` (default) SD 2.1's DDIM scheduler predicting v and its
    upcast attention, with ``"epsilon"`` 2.1-base's PNDM. ``sample_size`` 64 gives 512 px by default
    (``96``: SD 2.1's 768 px).
    """
    from diffusers import DDIMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    if prediction_type not in ("v_prediction", "epsilon"):
        raise ValueError(
            f"prediction_type must be 'v_prediction' (SD 2.1) or 'epsilon' (SD 2.1-base), got {prediction_type!r}"
        )
    tokenizer = tiny_tokenizer_bang()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=32,
            attention_head_dim=(2, 2, 4, 4),
            use_linear_projection=True,
            upcast_attention=prediction_type == "v_prediction",
            norm_num_groups=8,
        )
        vae = _tiny_vae(0.18215)
        text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_act="gelu"))
        _responsive(unet, cross_attention_gain)
    if prediction_type == "v_prediction":
        scheduler = DDIMScheduler.from_config(SD21_DDIM_CONFIG)
    else:
        scheduler = PNDMScheduler.from_config(SD14_PNDM_CONFIG)
    return _sd_pipeline(unet, vae, text_encoder, tokenizer, scheduler)


def tiny_xl_pipeline(seed: int = 0, sample_size: int = 64, cross_attention_gain: float = CROSS_ATTENTION_GAIN):
    """Random SDXL-shaped ``StableDiffusionXLPipeline`` on CPU, fp32, built offline (``"tiny-xl"``).

    SDXL's layout, scaled down: no cross-attention in the first (highest-resolution) level, several
    transformer layers per attention (``transformer_layers_per_block`` (1, 2, 3) for SDXL's (1, 2, 10)),
    two text encoders (``CLIPTextModel`` and ``CLIPTextModelWithProjection``, whose hidden states are
    concatenated), the pooled projection and size/crop time ids as added conditioning (``text_time``),
    the second tokenizer padding with ``!``, SDXL's Euler scheduler and VAE scaling. ``sample_size`` 64
    gives 512 px by default (``128``: SDXL's 1024 px).
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_tokenizer_bang()
    time_dim = 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_text_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden_act="gelu"))
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 3),
            attention_head_dim=(2, 4, 4),
            use_linear_projection=True,
            cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + text_encoder_2.config.projection_dim,
            norm_num_groups=8,
        )
        vae = _tiny_vae(0.13025)
        _responsive(unet, cross_attention_gain)
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet.eval(),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_EULER_CONFIG),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_clip(seed: int = 0):
    """Random tiny ``CLIPModel`` with the tiny tokenizer and a 32-px image processor: ``(model, tokenizer, image_processor)``."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tokenizer = tiny_tokenizer()
    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            **ids,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, tokenizer, processor


def tiny_blip(seed: int = 0):
    """Random tiny ``BlipForConditionalGeneration`` with a WordPiece tokenizer over the tiny vocabulary: ``(model, processor)``."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {token: i for i, token in enumerate(specials + vocabulary_words() + list("abcdefghijklmnopqrstuvwxyz.,"))}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        encoder_hidden_size=32,
        max_position_embeddings=64,
        bos_token_id=vocab["[DEC]"],
        sep_token_id=vocab["[SEP]"],
        pad_token_id=vocab["[PAD]"],
        eos_token_id=vocab["[SEP]"],
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision)).eval()
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    return model, processor


def sd14_sized_pipeline(seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Random-weight pipeline with SD-1.4's real UNet (860M parameters), VAE and CLIP ViT-L text encoder
    sizes, built offline (for speed and memory benchmarks; its images are noise). Uses the tiny tokenizer."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text_encoder = CLIPTextModel(
            _text_config(
                tokenizer, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
            )
        )
    pipe = _sd_pipeline(unet, vae, text_encoder, tokenizer, PNDMScheduler.from_config(SD14_PNDM_CONFIG))
    for module in (
        pipe.unet,
        pipe.vae,
        pipe.text_encoder,
    ):  # module by module: the pipeline-level cast warns about fp32 modules
        module.to(dtype=dtype).requires_grad_(False)
    return pipe


def tiny_owl(seed: int = 0, kind: str = "owlv2"):
    """Random tiny ``Owlv2ForObjectDetection`` (``kind="owlvit"``: ``OwlViTForObjectDetection``) with the tiny
    tokenizer and a 32-px processor of the same family: ``(model, processor)``.

    32-px input, 8-px patches: 16 boxes per image. The tokenizer has 16 positions like OWL's text model.
    As the real processors do, OWLv2's pads an image at the bottom/right to a square, then resizes it;
    OWL-ViT's stretches it to the square. The heads are re-scaled after initialisation (as built, every
    score saturates at 1.0 and every box at an image corner, which would test nothing): the logit scale
    is 4 and the logit shift small, so scores spread over (0, 1) and differ between queries; the box head
    propagates unit variance and its output is small, so boxes lie near their grid cells and still
    depend on the image.
    """
    import transformers

    if kind not in ("owlv2", "owlvit"):
        raise ValueError(f"kind must be 'owlv2' or 'owlvit', got {kind!r}")
    prefix = {"owlv2": "Owlv2", "owlvit": "OwlViT"}[kind]
    config_class, model_class, image_processor_class, processor_class = (
        getattr(transformers, prefix + name)
        for name in ("Config", "ForObjectDetection", "ImageProcessorPil", "Processor")
    )
    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = 16
    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    width = 32
    config = config_class(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            **ids,
        ),
        vision_config=dict(
            hidden_size=width,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=width,  # the class head compares image embeddings of the text width with projected queries
    )
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        model = model_class(config).eval()
        head = model.class_head
        head.logit_shift.weight.normal_(0.0, 0.1 * width**-0.5)
        head.logit_scale.weight.zero_()
        head.logit_scale.bias.fill_(3.0)  # elu(3) + 1 = 4
        for layer in (model.box_head.dense0, model.box_head.dense1, model.box_head.dense2):
            layer.weight.normal_(0.0, width**-0.5)
        model.box_head.dense2.weight.mul_(0.3)
    size = {"height": 32, "width": 32}
    image_processor = image_processor_class(size=size, **({"crop_size": size} if kind == "owlvit" else {}))
    return model, processor_class(image_processor=image_processor, tokenizer=tokenizer)


#: Stable Diffusion 3 medium's scheduler (scheduler/scheduler_config.json of stabilityai/stable-diffusion-3-medium-diffusers).
SD3_FLOW_CONFIG = dict(num_train_timesteps=1000, shift=3.0)
#: FLUX.1-dev's scheduler (black-forest-labs/FLUX.1-dev, scheduler/scheduler_config.json).
FLUX_FLOW_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def tiny_t5_tokenizer():
    """A ``T5Tokenizer`` (unigram, ``</s>`` at the end, no ``<sot>``) in which every vocabulary word is one piece
    ``▁word``; other text falls back to single characters, as T5's SentencePiece model does for rare words."""
    import string

    from transformers import T5Tokenizer

    special = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    words = [("\u2581" + w, -1.0) for w in vocabulary_words()]
    chars = [(c, -10.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=special + words + chars + [("\u2581", -5.0)], extra_ids=0)


def _sd3_pipeline(transformer, vae, encoders, tokenizers):
    """A ``StableDiffusion3Pipeline`` of these parts in eval mode, SD 3 medium's scheduler, no progress bar."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    (text_encoder, text_encoder_2, text_encoder_3), (tokenizer, tokenizer_2, tokenizer_3) = encoders, tokenizers
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_FLOW_CONFIG),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3.eval(),
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_t5(tokenizer, d_model: int = 32, d_kv: int = 8, d_ff: int = 64, num_layers: int = 2, num_heads: int = 4):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _responsive_joint(transformer, gain: float) -> None:
    """Sharpen every joint attention's image-query × text-key scores by ``gain`` (as :func:`_responsive` does for
    cross-attention): the query/key normalisations' weights where the block has them (RMS norm undoes a scaled
    projection), else the image-query and text-key projections."""
    with torch.no_grad():
        for name, module in transformer.named_modules():
            if not name.endswith(".attn"):
                continue
            norms = [getattr(module, n, None) for n in ("norm_q", "norm_added_k", "norm_k")]
            if norms[0] is not None and getattr(norms[0], "weight", None) is not None:
                for norm in norms:
                    if norm is not None:
                        norm.weight.mul_(gain**0.5)
            else:
                module.to_q.weight.mul_(gain)
                if getattr(module, "add_k_proj", None) is not None:
                    module.add_k_proj.weight.mul_(gain)


def tiny_sd3_pipeline(seed: int = 0, sample_size: int = 32, cross_attention_gain: float = CROSS_ATTENTION_GAIN):
    """Random SD-3-shaped ``StableDiffusion3Pipeline`` on CPU, fp32, built offline (``"tiny-sd3"``).

    SD 3's layout, scaled down (diffusers' own test configuration, with four joint blocks and SD 3's patch 2): an
    ``SD3Transformer2DModel`` whose last block is ``context_pre_only``, two CLIP encoders with projection (hidden
    states concatenated, then padded to T5's width) and a T5 encoder whose positions follow CLIP's 77 in the joint
    text, the SD 3 VAE's shift and scale, SD 3 medium's flow-matching scheduler. ``sample_size`` 32 gives 256 px
    (a 16×16 image-token grid) by default.
    """
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    tokenizer, tokenizer_2, tokenizer_3 = tiny_tokenizer(), tiny_tokenizer_bang(), tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = dict(hidden_size=16, intermediate_size=32, projection_dim=16)
        text_encoder = CLIPTextModelWithProjection(_text_config(tokenizer, **clip))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden_act="gelu", **clip))
        text_encoder_3 = _tiny_t5(tokenizer_3)
        transformer = SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=2,
            in_channels=4,
            num_layers=4,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            out_channels=4,
        )
        vae = _tiny_vae(1.5305, force_upcast=False)
        vae.register_to_config(shift_factor=0.0609)
        _responsive_joint(transformer, cross_attention_gain)
    pipe = _sd3_pipeline(
        transformer, vae, (text_encoder, text_encoder_2, text_encoder_3), (tokenizer, tokenizer_2, tokenizer_3)
    )
    return pipe


def tiny_flux_pipeline(seed: int = 0, sample_size: int = 32, cross_attention_gain: float = CROSS_ATTENTION_GAIN):
    """Random FLUX-shaped ``FluxPipeline`` on CPU, fp32, built offline (``"tiny-flux"``).

    FLUX.1-dev's layout, scaled down (diffusers' own test configuration, two double-stream and two single-stream
    blocks): latents packed 2×2 into tokens, RoPE over text and image positions, QK RMS norms, a guidance embedding
    (no CFG batch), a CLIP encoder giving only the pooled vector and a T5 encoder giving the text tokens, FLUX's
    VAE shift and scale and its resolution-dependent flow-matching shift. ``sample_size`` 32 (the pipeline's
    ``default_sample_size``, FLUX's is 128) gives 256 px (16×16 image tokens) by default.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_text_config(tokenizer))
        text_encoder_2 = _tiny_t5(tokenizer_2)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        )
        vae = _tiny_vae(0.3611, force_upcast=False)
        vae.register_to_config(shift_factor=0.1159)
        _responsive_joint(transformer, cross_attention_gain)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_FLOW_CONFIG),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
        transformer=transformer.eval(),
    )
    pipe.default_sample_size = sample_size
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_sized_pipeline(seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Random-weight ``StableDiffusion3Pipeline`` with SD 3 medium's real transformer (24 joint blocks, 2B parameters)
    and VAE (16 latent channels), built offline for speed and memory checks (its images are noise). The text encoders
    are one-layer stand-ins with the real output widths (CLIP-L 768, CLIP-G 1280, T5 4096), so the joint attention
    sees SD 3's 77 + 256 text tokens; the tiny tokenizers."""
    from diffusers import (
        AutoencoderKL,
        SD3Transformer2DModel,
    )
    from transformers import CLIPTextModelWithProjection

    tokenizer, tokenizer_2, tokenizer_3 = tiny_tokenizer(), tiny_tokenizer_bang(), tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=192,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=16,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        clip = dict(num_hidden_layers=1, num_attention_heads=8)
        text_encoder = CLIPTextModelWithProjection(
            _text_config(tokenizer, hidden_size=768, intermediate_size=1024, projection_dim=768, **clip)
        )
        text_encoder_2 = CLIPTextModelWithProjection(
            _text_config(
                tokenizer_2, hidden_act="gelu", hidden_size=1280, intermediate_size=1024, projection_dim=1280, **clip
            )
        )
        text_encoder_3 = _tiny_t5(tokenizer_3, d_model=4096, d_kv=64, d_ff=1024, num_layers=1, num_heads=8)
    pipe = _sd3_pipeline(
        transformer, vae, (text_encoder, text_encoder_2, text_encoder_3), (tokenizer, tokenizer_2, tokenizer_3)
    )
    for module in (transformer, vae, text_encoder, text_encoder_2, text_encoder_3):
        module.to(dtype=dtype).requires_grad_(False)
    return pipe
