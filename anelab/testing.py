"""The offline stand-in models under the name tests and notebooks have always imported: everything here is
:mod:`anelab.stand_ins` (production code imports that module, never this one)."""

from .stand_ins import (  # noqa: F401
    CROSS_ATTENTION_GAIN,
    SD14_PNDM_CONFIG,
    SD21_DDIM_CONFIG,
    SDXL_EULER_CONFIG,
    TINY_MODELS,
    TINY_VERSION,
    sd14_sized_pipeline,
    tiny_blip,
    tiny_clip,
    tiny_model,
    tiny_owl,
    tiny_parts,
    tiny_pipeline,
    tiny_sd2_pipeline,
    tiny_tokenizer,
    tiny_tokenizer_bang,
    tiny_xl_pipeline,
    vocabulary_words,
)
