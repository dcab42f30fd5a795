"""SD 2.x and SDXL: the offline stand-ins, parity with their diffusers pipelines, guidance, suppression and layout,
recording, token positions and softmax columns, study fitting, a sweep into the store, loading."""

import json
import time

import numpy as np
import pytest
import torch

import anelab
from anelab import AnelabError, GuidanceConfig, Record
from anelab.hooks import cross_attention_layers
from anelab.models import Architecture, attention_resolutions, family, native_size, scaled_resolution
from anelab.pipeline import plan_run
from anelab.tokens import prompt_ids

PROMPT, TOKENS = "a cat and a dog", ["cat", "dog"]
SMALL = dict(height=128, width=128, output_type="latent", progress=False)
NAMES = ("tiny-sd2", "tiny-xl")


@pytest.fixture(scope="module")
def pipes():
    return {name: anelab.load_pipeline(name, device="cpu") for name in NAMES}


def test_stand_ins_build_in_seconds_with_their_architecture(pipes):
    from transformers import CLIPTextModelWithProjection

    start = time.perf_counter()
    built = {name: anelab.load_pipeline(name, device="cpu") for name in NAMES}
    assert time.perf_counter() - start < 10
    sd2, xl = built["tiny-sd2"], built["tiny-xl"]
    assert type(sd2).__name__ == "StableDiffusionPipeline" and family(sd2) == "sd2"
    assert (
        sd2.text_encoder.config.hidden_act == "gelu"
        and sd2.tokenizer.pad_token == "!"
        and sd2.tokenizer.pad_token_id == 0
    )
    assert sd2.unet.config.use_linear_projection and tuple(sd2.unet.config.attention_head_dim) == (2, 2, 4, 4)
    assert type(xl).__name__ == "StableDiffusionXLPipeline" and family(xl) == "sdxl"
    assert (
        isinstance(xl.text_encoder_2, CLIPTextModelWithProjection)
        and xl.tokenizer_2.pad_token == "!"
        and xl.tokenizer.pad_token == "<|endoftext|>"
    )
    assert (
        xl.unet.config.addition_embed_type == "text_time" and xl.unet.config.cross_attention_dim == 64
    )  # both encoders, concatenated
    layers = cross_attention_layers(xl.unet, 64, 64)
    assert not any(
        layer.name.startswith(("down_blocks.0.", "up_blocks.2.")) for layer in layers
    )  # no cross-attention at the top level
    per_attention = {}
    for layer in layers:
        attention = layer.name.split(".transformer_blocks")[0]
        per_attention[attention] = per_attention.get(attention, 0) + 1
    assert per_attention["down_blocks.1.attentions.0"] == 2 and per_attention["down_blocks.2.attentions.1"] == 3
    assert per_attention["mid_block.attentions.0"] == 3 and per_attention["up_blocks.0.attentions.2"] == 3
    assert (
        native_size(sd2) == native_size(xl) == 512
    )  # stand-ins are 512 px models (tiny_*_pipeline(sample_size=...) for others)
    assert attention_resolutions(sd2) == [8, 16, 32, 64] and attention_resolutions(xl) == [16, 32]
    assert attention_resolutions(xl, 128, 128) == [4, 8] and anelab.attention_resolutions(sd2, 128, 128) == [
        2,
        4,
        8,
        16,
    ]


@pytest.mark.parametrize("name", NAMES)
def test_plain_sd_equals_the_models_diffusers_pipeline(pipes, name):
    """config=None is the model's own pipeline (SDXL: pooled embeddings, time ids, zeroed negative prompt, Euler)."""
    pipe = pipes[name]
    ref = pipe(
        PROMPT,
        generator=torch.Generator("cpu").manual_seed(3),
        num_inference_steps=4,
        guidance_scale=7.5,
        height=128,
        width=128,
        output_type="latent",
    ).images
    out = anelab.generate(pipe, PROMPT, seeds=[3], config=None, num_inference_steps=4, guidance_scale=7.5, **SMALL)
    difference = float((out.latents - ref).abs().max() / ref.abs().max())
    print(f"{name}: max relative latent difference {difference:.2e}")
    assert difference < 1e-5


def test_the_sd2_stand_in_predicts_v(pipes):
    from diffusers import DDIMScheduler

    from anelab.testing import tiny_sd2_pipeline

    pipe = pipes["tiny-sd2"]
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.upcast_attention  # SD 2.1 (768 px, v) upcasts attention; 2.1-base does not
    base = tiny_sd2_pipeline(prediction_type="epsilon")
    assert base.scheduler.config.prediction_type == "epsilon" and not base.unet.config.upcast_attention
    as_epsilon = type(pipe)(
        **{**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon")}
    )
    v, eps = (
        anelab.generate(p, PROMPT, seeds=[0], config=None, num_inference_steps=4, **SMALL).latents
        for p in (pipe, as_epsilon)
    )
    assert not torch.allclose(v, eps, atol=1e-3)  # the prediction type is read: same weights, other latents
    ref = as_epsilon(
        PROMPT,
        generator=torch.Generator("cpu").manual_seed(0),
        num_inference_steps=4,
        height=128,
        width=128,
        output_type="latent",
    ).images
    torch.testing.assert_close(eps, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_guidance_at_every_resolution_moves_the_latent_and_is_traced(pipes, name):
    pipe = pipes[name]
    plain = anelab.generate(pipe, PROMPT, seeds=[0], config=None, num_inference_steps=5, **SMALL).latents
    for res in attention_resolutions(pipe, 128, 128):
        config = GuidanceConfig(
            attention_res=res, thresholds={0: 0.9, 2: 0.9}, max_iter_to_alter=3, max_refinement_steps=2
        )
        out = anelab.generate(pipe, PROMPT, TOKENS, seeds=[0], config=config, num_inference_steps=5, **SMALL)
        assert not torch.allclose(out.latents, plain), res
        tr = out.trace
        assert sorted(tr.step.unique()) == [0, 1, 2] and set(tr.token) == set(TOKENS) and set(tr.token_index) == {2, 5}
        assert tr.triggered.any() and (tr.refinement_iterations > 0).any() and tr.updated.all(), (
            res
        )  # refinement exercised
        assert np.isfinite(tr.max_attention).all() and tr.max_attention.between(0, 1).all()


def test_sdxl_guidance_steps_in_the_unets_input_space(pipes):
    """Euler's latent is the UNet's input × √(σ²+1): the A&E step is taken on the input, as on SD 1.x (scale 1 there)."""
    pipe = pipes["tiny-xl"]
    from anelab.pipeline import _Sampler

    plan = plan_run(
        pipe,
        PROMPT,
        tokens=TOKENS,
        config=GuidanceConfig(attention_res=8, thresholds={}, max_iter_to_alter=1),
        num_inference_steps=5,
        height=128,
        width=128,
    )
    seen = []
    original = _Sampler.guide

    def guide(self, z, i, t):
        seen.append((z.std().item(), float(self.scheduler.init_noise_sigma)))
        return original(self, z, i, t)

    _Sampler.guide = guide
    try:
        anelab.generate(pipe, PROMPT, TOKENS, seeds=[0], config=plan.config, num_inference_steps=5, **SMALL)
    finally:
        _Sampler.guide = original
    ((std, sigma),) = seen
    assert sigma > 5 and 0.5 < std < 2  # the guided forward saw unit-scale input, not the σ-scaled latent


@pytest.mark.parametrize("name", NAMES)
def test_suppression_and_layout_run(pipes, name):
    pipe = pipes[name]
    res = attention_resolutions(pipe, 128, 128)[-1]
    config = GuidanceConfig(
        attention_res=res, thresholds={0: 0.5}, max_iter_to_alter=3, max_refinement_steps=2, suppress_bound=0.0
    )
    out = anelab.generate(
        pipe,
        PROMPT,
        ["cat"],
        seeds=[0],
        config=config,
        suppress=["dog"],
        layout={"cat": (0.8, 0.5)},
        num_inference_steps=5,
        **SMALL,
    )
    tr = out.trace
    assert set(tr.role) == {"excite", "suppress"} and tr.suppress_loss.notna().any() and tr.layout_kl.notna().any()
    assert np.isfinite(tr.objective).all() and tr.updated.any()


@pytest.mark.parametrize("name", NAMES)
def test_recording_covers_every_resolution_by_default(pipes, name):
    from anelab import plotting

    pipe = pipes[name]
    out = anelab.generate(
        pipe, PROMPT, TOKENS, seeds=[0, 1], config=None, num_inference_steps=3, record=Record(), **SMALL
    )
    cache = out.attention
    assert sorted(cache.resolutions) == attention_resolutions(pipe, 128, 128)
    assert [layer.name for layer in cache.layers] == [layer.name for layer in cross_attention_layers(pipe.unet, 16, 16)]
    assert sorted(cache.stats().res.unique()) == attention_resolutions(pipe, 128, 128)
    grid = plotting.attention_grid(cache, step=1, seed=0)
    assert len([a for a in grid.axes if a.get_title().startswith("res ")]) == len(cache.resolutions)
    trends = plotting.attention_trends({"SD": cache.stats()})
    assert len([a for a in trends.axes if "resolution" in a.get_title()]) == len(cache.resolutions)


def test_the_explorer_shows_sdxls_resolutions_and_layers(pipes):
    pytest.importorskip("ipywidgets")
    from anelab.explore import attention_explorer

    out = anelab.generate(
        pipes["tiny-xl"], PROMPT, TOKENS, seeds=[0], config=None, num_inference_steps=2, record=Record(), **SMALL
    )
    explorer = attention_explorer(out.attention)
    assert tuple(explorer.controls["res"].options) == (8, 4)
    for res in (8, 4):
        explorer.controls["res"].value = res
        layers = [label for label, _ in explorer.controls["layer"].options][1:]
        assert (
            len(layers) == len(out.attention.layers_at(res)) and explorer.error is None and explorer.figure is not None
        )
    assert {"down 2.0 t2", "mid t2", "up 0.2 t2"} <= set(
        layers
    )  # several transformer blocks per attention at SDXL's lowest level


def test_softmax_columns_per_family_and_the_recording_agrees_with_the_trace(pipes, tiny_pipe):
    """'legacy' = the official columns for the model: SD 1.x 1..75; SD 2.x and SDXL ('!' padding) the prompt's tokens."""
    assert (
        plan_run(tiny_pipe, PROMPT, tokens=TOKENS, config=GuidanceConfig(attention_res=8)).normaliser.softmax_tokens
        == "legacy"
    )
    for name, pipe in pipes.items():
        plan = plan_run(pipe, PROMPT, tokens=TOKENS, config=GuidanceConfig(attention_res=8), height=128, width=128)
        assert plan.normaliser.softmax_tokens == "prompt" and plan.config.softmax_tokens == "legacy", name
        assert (
            plan_run(
                pipe,
                PROMPT,
                tokens=TOKENS,
                config=GuidanceConfig(attention_res=8, softmax_tokens="padded"),
                height=128,
                width=128,
            ).normaliser.softmax_tokens
            == "padded"
        )
        # a guided step that does not move (α = 0) measures the latent the recording then observes: same numbers
        config = GuidanceConfig(attention_res=8, thresholds={}, max_iter_to_alter=3, scale_factor=0.0)
        out = anelab.generate(
            pipe,
            PROMPT,
            TOKENS,
            seeds=[0],
            config=config,
            num_inference_steps=4,
            record=Record(resolutions=[8], tokens="prompt"),
            **SMALL,
        )
        stats = out.attention.stats()
        for step in (0, 1, 2):
            traced = out.trace[out.trace.step == step].set_index("token_index").max_attention
            recorded = stats[stats.step == step].set_index("token_index").max_attention
            np.testing.assert_allclose(traced.loc[[2, 5]], recorded.loc[[2, 5]], rtol=1e-4, err_msg=name)
        eot = stats[stats.token == "<eot>"]
        assert len(eot) and eot.max_attention.isna().all()  # <eot> is outside the prompt columns


def test_sdxl_tokenizers_agree_on_positions(pipes, ane_prompts):
    from anelab.models import check_tokenizers

    xl = pipes["tiny-xl"]
    for prompt in ane_prompts.prompt:
        first, second = prompt_ids(xl.tokenizer, prompt), prompt_ids(xl.tokenizer_2, prompt)
        assert first == second, prompt
        padded = [t(prompt, padding="max_length", max_length=77).input_ids for t in (xl.tokenizer, xl.tokenizer_2)]
        assert padded[0][: len(first)] == padded[1][: len(first)] and set(padded[1][len(first) :]) <= {
            0
        }  # only the padding differs
    out = anelab.generate(
        xl,
        "a turtle and a bird",
        ["turtle", "bird"],
        seeds=[0],
        config=GuidanceConfig(attention_res=8, thresholds={}, max_iter_to_alter=1),
        num_inference_steps=2,
        **SMALL,
    )
    assert out.token_indices == [2, 5] and set(out.trace.token) == {"turtle", "bird"}

    class Shifted:  # a second tokenizer that splits differently
        def __init__(self, tokenizer):
            self.tokenizer, self.model_max_length = tokenizer, tokenizer.model_max_length

        def __call__(self, text, **kwargs):
            return self.tokenizer("a " + text, **kwargs)

    xl.tokenizer_2, original = Shifted(xl.tokenizer_2), xl.tokenizer_2
    try:
        with pytest.raises(AnelabError, match="tokenizers split 'a cat' differently"):
            check_tokenizers(xl, "a cat")
    finally:
        xl.tokenizer_2 = original


@pytest.mark.parametrize("name", NAMES)
def test_a_resolution_the_model_lacks_is_one_line_naming_those_it_has(pipes, name):
    pipe = pipes[name]
    have = attention_resolutions(pipe, 128, 128)
    with pytest.raises(AnelabError) as info:
        anelab.generate(pipe, PROMPT, TOKENS, config=GuidanceConfig(attention_res=64), **SMALL)
    message = str(info.value)
    assert (
        "\n" not in message
        and "attention_res 64 does not exist at 128x128" in message
        and str(sorted(have, reverse=True)) in message
    )
    with pytest.raises(AnelabError, match=r"cannot record resolution\(s\) \[32\]"):
        anelab.generate(pipe, PROMPT, TOKENS, config=None, record=Record(resolutions=[32]), **SMALL)


def test_studies_fit_each_models_native_side():
    from anelab.runs import load_study
    from anelab.runs.study import fit_study
    from anelab.testing import tiny_sd2_pipeline, tiny_xl_pipeline

    sdxl = Architecture.of(tiny_xl_pipeline(sample_size=128))  # SDXL's 1024 px
    sd21 = Architecture.of(tiny_sd2_pipeline(sample_size=96))  # SD 2.1's 768 px
    tiny = Architecture.of(anelab.load_pipeline("tiny"))
    resolution = load_study("resolution")
    assert fit_study(resolution, tiny) is resolution  # SD 1.x: the file as written (same keys as before)
    on_xl = fit_study(resolution, sdxl)
    assert on_xl.size == 1024 and {k: c and c.attention_res for k, c in on_xl.variants.items()} == {
        "sd": None,
        "res16": 32,
        "res32": 64,
    }
    assert (
        set(on_xl.dropped) == {"res8", "res64"}
        and "this model has cross-attention at [32, 64] at 1024 px" in on_xl.dropped["res8"]
    )
    assert (
        on_xl.record.resolutions == (64, 32)
        and on_xl.spec()["dropped"] == on_xl.dropped
        and on_xl.spec()["scaled"] is False
    )
    assert fit_study(on_xl, sdxl) is on_xl  # fitted once is fitted
    on_21 = fit_study(resolution, sd21)
    assert (
        on_21.size == 768
        and [c.attention_res for c in on_21.variants.values() if c] == [12, 24, 32 + 16, 96]
        and not on_21.dropped
    )
    smoke = fit_study(
        load_study("reproduction", scale="smoke"), sdxl
    )  # the smallest side at which 16's analogue (32) exists
    assert smoke.size == 512 and smoke.variants["ae"].attention_res == 32
    assert scaled_resolution(sdxl.unet, 16, 1024) == 32


def test_a_sweep_on_sdxl_drops_what_it_lacks_and_reads_back(pipes, tmp_path, notes):
    from anelab.runs import Store, load_results, load_stats, load_study, load_trace, load_view, run_sweep

    study = load_study(
        {
            "name": "xl_small",
            "prompts": [{"prompt": PROMPT, "tokens": TOKENS}],
            "seeds": 2,
            "steps": 3,
            "size": 256,
            "batch": 2,
            "base": {"thresholds": {0: 0.5}, "max_refinement_steps": 2},
            "variants": {"sd": None, "res8": {"attention_res": 8}, "res32": {"attention_res": 32}},
            "record": {},
        }
    )
    store = Store(tmp_path / "store")
    summary = run_sweep(study, pipes["tiny-xl"], tmp_path / "view", model="tiny-xl", store=store, progress=False)
    said = notes.text
    assert "variant res32 dropped: attention_res 32: this model has cross-attention at [8, 16] at 256 px" in said
    assert summary["images"] == 4
    view, keys, _ = load_view(tmp_path / "view")
    assert view["study"]["dropped"].keys() == {"res32"} and view["model"] == "tiny-xl"
    results = load_results(tmp_path / "view")
    assert list(results.variant.unique()) == ["sd", "res8"] and all(
        map(lambda p: __import__("os").path.isfile(p), results.image)
    )
    assert (
        sorted(load_stats(tmp_path / "view").res.unique()) == [8, 16]
        and load_trace(tmp_path / "view").variant.eq("res8").all()
    )
    rows = store.latest_rows(set(keys.key), columns=["identity"])
    assert {json.loads(i)["model"] for i in rows.identity} == {"tiny-xl/1"}
    again = run_sweep(study, pipes["tiny-xl"], tmp_path / "view", model="tiny-xl", store=store, progress=False)
    assert again["images"] == 0 and again["already"] == 4  # the store has them: nothing is made twice


def test_loading_sdxl_from_a_directory_and_its_placement(pipes, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from anelab.runs.store import model_identity

    pipes["tiny-xl"].save_pretrained(tmp_path / "xl")
    loaded = anelab.load_pipeline(str(tmp_path / "xl"), device="cpu")
    assert isinstance(loaded, StableDiffusionXLPipeline)
    args = dict(seeds=[0], config=None, num_inference_steps=2, **SMALL)
    same = [anelab.generate(p, PROMPT, **args).latents for p in (loaded, pipes["tiny-xl"])]
    torch.testing.assert_close(*same, rtol=1e-4, atol=1e-4)  # memory-mapped weights round differently in the last bit
    meta = anelab.load_pipeline("tiny-xl", device="meta")
    assert {p.device.type for p in meta.text_encoder_2.parameters()} == {"meta"}
    half = anelab.load_pipeline("tiny-xl", device="cpu", dtype="fp16")
    assert (
        half.unet.dtype == half.text_encoder_2.dtype == torch.float16 and half.vae.dtype == torch.float32
    )  # force_upcast
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(AnelabError, match="is a KandinskyPipeline; anelab runs SD 1.x / 2.x"):
        anelab.load_pipeline(str(tmp_path / "other"), device="cpu")
    assert (model_identity("tiny"), model_identity("tiny-sd2"), model_identity("tiny-xl")) == (
        "tiny/1",
        "tiny-sd2/1",
        "tiny-xl/1",
    )


def test_the_report_plan_counts_the_fitted_studies(tmp_path):
    from anelab.runs import Store
    from anelab.runs.protocol import Context, plan_report

    context = Context.of("tiny-xl", device="cpu")
    assert context.identity == "tiny-xl/1" and context.arch.family == "sdxl"
    table, _ = plan_report(
        ["06_architectures", "01_reproduction"], scale="smoke", context=context, store=Store(tmp_path / "store")
    )
    rows = table.set_index("notebook")
    assert rows.loc["06_architectures", "images"] == 3  # sd, res16, res32 (res8 and res64 dropped) x 1 prompt x 1 seed
    assert (
        rows.loc["01_reproduction", "images"] == 2 * 3 and rows.loc["total", "in_store"] == 0
    )  # sd and ae x 3 categories
