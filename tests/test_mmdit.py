"""SD 3 and FLUX (anelab.mmdit): the offline stand-ins, bit-for-bit parity with StableDiffusion3Pipeline and FluxPipeline,
the joint-attention capture against the attention the blocks really compute, CLIP/T5 token columns, guidance with every
method that applies, the flow-matching step rule, the block choice, family defaults, loading, and bad input."""

import time

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import anelab
from anelab import AnelabError, GuidanceConfig, mmdit
from anelab.hooks import Layer, attention_capture
from anelab.pipeline import denoiser, plan_run

PROMPT, TOKENS = "a red cat and a dog", ["cat", "dog"]
FAST = dict(num_inference_steps=4, output_type="latent", progress=False)
NAMES = ("tiny-sd3", "tiny-flux")


@pytest.fixture(scope="module")
def pipes():
    return {name: anelab.load_pipeline(name, device="cpu") for name in NAMES}


def diffusers_latents(pipe, seed, **options) -> torch.Tensor:
    """The model's own diffusers pipeline, one seed (or a batch of seeds, one generator each), final latents
    unpacked to [n, C, h, w]."""
    seeds = [seed] if isinstance(seed, int) else list(seed)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe(PROMPT, generator=generators, num_images_per_prompt=len(seeds), output_type="latent", **options).images
    if out.ndim == 3:  # FLUX returns its packed tokens
        side = options.get("height", mmdit.native_size(pipe))
        out = pipe._unpack_latents(out, side, side, pipe.vae_scale_factor)
    return out


def test_stand_ins_build_in_seconds_with_their_families_layout():
    start = time.perf_counter()
    sd3, flux = (anelab.load_pipeline(name, device="cpu") for name in NAMES)
    assert time.perf_counter() - start < 15
    assert type(sd3).__name__ == "StableDiffusion3Pipeline" and type(flux).__name__ == "FluxPipeline"
    assert anelab.models.family(sd3) == "sd3" and anelab.models.family(flux) == "flux"
    assert [b.place for b in mmdit.blocks(sd3, 256, 256)] == ["joint"] * 4
    assert [b.place for b in mmdit.blocks(flux, 256, 256)] == ["double", "double", "single", "single"]
    assert sd3.transformer.transformer_blocks[-1].context_pre_only
    t5 = sd3.tokenizer_3
    assert t5.convert_ids_to_tokens(t5("a cat")["input_ids"]) == ["\u2581a", "\u2581cat", "</s>"]  # no <sot>
    assert mmdit.grid(sd3, 256, 256) == (16, 16) and mmdit.grid(flux, 512, 256) == (32, 16)


@pytest.mark.parametrize("name", NAMES)
def test_unguided_generate_equals_the_diffusers_pipeline_bit_for_bit(pipes, name):
    pipe = pipes[name]
    batch = anelab.generate(pipe, PROMPT, seeds=[0, 7], **FAST)  # one batch of two seeds, as the pipeline batches them
    assert torch.equal(batch.latents, diffusers_latents(pipe, [0, 7], num_inference_steps=4))
    single = anelab.generate(pipe, PROMPT, seeds=[7], **FAST)
    assert torch.equal(single.latents, diffusers_latents(pipe, 7, num_inference_steps=4))
    # a batch's GEMMs may round differently from one seed's (FLUX on some BLAS): the same numbers to float precision
    assert (batch.latents[1:] - single.latents).abs().max() < 1e-4


def test_family_defaults_are_each_pipelines_own(pipes, tiny_pipe):
    sd3, flux = pipes["tiny-sd3"], pipes["tiny-flux"]
    for pipe, steps, scale in ((sd3, 28, 7.0), (flux, 28, 3.5), (tiny_pipe, 50, 7.5)):
        plan = plan_run(pipe, PROMPT)
        assert (plan.num_inference_steps, plan.guidance_scale) == (steps, scale)
    xl = anelab.load_pipeline("tiny-xl", device="cpu")
    assert plan_run(xl, PROMPT).guidance_scale == 5.0  # StableDiffusionXLPipeline's default
    # at the defaults (no steps, no scale given on either side) SD 3 equals its pipeline
    assert torch.equal(
        anelab.generate(sd3, PROMPT, seeds=[2], output_type="latent", progress=False).latents, diffusers_latents(sd3, 2)
    )


def test_flux_guidance_scale_is_its_embedding_with_no_cfg_batch(pipes):
    flux = pipes["tiny-flux"]
    a = anelab.generate(flux, PROMPT, seeds=[1], guidance_scale=5.0, **FAST).latents
    b = anelab.generate(flux, PROMPT, seeds=[1], guidance_scale=1.5, **FAST).latents
    assert torch.equal(a, diffusers_latents(flux, 1, num_inference_steps=4, guidance_scale=5.0))
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_decoded_images_equal_the_pipelines(pipes, name):
    pipe = pipes[name]
    ours = anelab.generate(pipe, PROMPT, seeds=[3], num_inference_steps=3, output_type="np", progress=False).images
    theirs = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(3), output_type="np").images
    assert ours.shape == theirs.shape == (1, 256, 256, 3)
    assert np.abs(ours - theirs).max() < 1e-6


class _AttentionCalls(TorchFunctionMode):
    """Records the query and key of every scaled_dot_product_attention call (what the blocks really attend with)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k = (args[i] if len(args) > i else kwargs[n] for i, n in ((0, "query"), (1, "key")))
            self.calls.append((q.detach(), k.detach()))
        return func(*args, **kwargs)


@pytest.mark.parametrize("name, text_first", [("tiny-sd3", False), ("tiny-flux", True)])
@pytest.mark.parametrize("softmax", ["text", "joint"])
def test_captured_maps_are_the_image_to_text_attention_the_blocks_compute(pipes, name, text_first, softmax):
    """Every block's capture against the softmax of the query and key its own attention call receives: SD 3's order is
    [image, text], FLUX's [text, image] after RoPE, FLUX's single-stream blocks get the text length from outside."""
    pipe = pipes[name]
    plan = plan_run(pipe, PROMPT)
    net = denoiser(pipe)
    conditioning = mmdit.JointConditioning.encode(
        pipe,
        PROMPT,
        height=256,
        width=256,
        cfg=False,
        guidance_scale=3.5,
        t5_length=mmdit.DEFAULTS[plan.family]["t5_length"],
        device="cpu",
        dtype=torch.float32,
    )
    n_text = conditioning.cond.shape[1]
    columns = mmdit.TextColumns(torch.eye(n_text, dtype=torch.float64), n_text, "t5")  # every text key its own column
    reading = mmdit.Reading(plan.family, columns, softmax, (16, 16), (16, 16))
    blocks = mmdit.blocks(pipe, 256, 256)
    captured = {}
    x = torch.randn(1, *mmdit.latent_shape(pipe, 256, 256)[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), attention_capture(net, blocks, lambda n, h, f: mmdit.JointCapture(n, h, f, reading)) as hooks:
        with hooks.reading({b.name: captured.__setitem__ for b in blocks}), _AttentionCalls() as calls:
            net(x, torch.tensor(900.0), **conditioning.unet_kwargs(1, cfg=False))
    assert len(calls.calls) == len(blocks) == len(captured)
    for block, (q, k) in zip(blocks, calls.calls):
        if q.shape[1] != pipe.transformer.config.num_attention_heads:  # FLUX's dispatch: [B, S, heads, d]
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        scores = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
        n_image = scores.shape[-1] - n_text
        image = slice(n_text, None) if text_first else slice(0, n_image)
        text = slice(0, n_text) if text_first else slice(n_image, None)
        if softmax == "joint":
            want = scores[:, :, image].softmax(-1)[..., text]
        else:
            want = scores[:, :, image][..., text].softmax(-1)
        got = captured[block.name].double()
        assert got.shape == want.shape == (1, pipe.transformer.config.num_attention_heads, 256, n_text)
        assert (got - want).abs().max() < 1e-5, block.name
    if softmax == "text":
        assert torch.allclose(got.sum(-1), torch.ones(()).double(), atol=1e-6)


def test_words_map_to_their_clip_and_t5_positions(pipes):
    sd3, flux = pipes["tiny-sd3"], pipes["tiny-flux"]
    mean = mmdit.TextColumns.of(sd3, PROMPT, None, 256)  # SD 3 default: the mean of CLIP and T5
    assert mean.token_maps == "mean" and mean.text_length == 77 + 256
    cat_clip, cat_t5 = 3, 2  # <sot> a red cat … ; ▁a ▁red ▁cat … (T5 has no <sot>)
    column = mean.matrix[:, cat_clip]
    assert column[cat_clip] == 0.5 and column[77 + cat_t5] == 0.5 and column.sum() == 1.0
    t5 = mmdit.TextColumns.of(flux, PROMPT, None, 512)  # FLUX default: T5 only, no CLIP keys
    assert t5.token_maps == "t5" and t5.matrix[cat_t5, cat_clip] == 1.0 and t5.matrix[:, cat_clip].sum() == 1.0
    eos = flux.tokenizer_2(PROMPT)["input_ids"].index(flux.tokenizer_2.eos_token_id)
    assert t5.matrix[eos, 7] == 1.0  # <eot> (CLIP position 7) is T5's </s>
    assert t5.matrix[:, 0].sum() == 0  # <sot> has no T5 key
    odd = mmdit.TextColumns.of(flux, "a qzx cat", None, 512)  # a word outside the vocabulary: pieces on both sides
    ids = flux.tokenizer("a qzx cat")["input_ids"]
    assert len(ids) > 5 and all(odd.matrix[:, p].sum() >= 1 for p in range(1, len(ids)))
    clip = mmdit.TextColumns.of(sd3, PROMPT, "clip", 256)
    assert clip.matrix[cat_clip, cat_clip] == 1.0 and clip.matrix[77:].sum() == 0


@pytest.mark.parametrize("name", NAMES)
def test_attend_and_excite_raises_the_weaker_subject_on_transformers(pipes, name):
    pipe = pipes[name]
    config = GuidanceConfig(scale_factor=200.0, max_refinement_steps=10).rescaled(50, 6)
    out = anelab.generate(
        pipe, PROMPT, TOKENS, seeds=[0, 1], config=config, num_inference_steps=6, output_type="latent", progress=False
    )
    plain = anelab.generate(pipe, PROMPT, seeds=[0, 1], num_inference_steps=6, output_type="latent", progress=False)
    assert (out.latents - plain.latents).abs().max() > 1e-3
    trace = out.trace.drop_duplicates(["seed", "step"])
    assert np.isfinite(trace["loss"]).all() and not trace["nonfinite"].any()
    refined = trace[trace["refinement_iterations"] > 0]
    assert len(refined) and (refined["final_loss"] < refined["loss"] - 0.01).all()


@pytest.mark.parametrize("name", NAMES)
def test_suppression_layout_and_the_zoo_methods_run_on_transformers(pipes, name):
    pipe = pipes[name]
    config = GuidanceConfig().rescaled(50, 4)
    out = anelab.generate(pipe, PROMPT, ["cat"], suppress=["dog"], layout={"cat": (0.2, 0.5)}, config=config, **FAST)
    first = out.trace[out.trace["step"] == 0]
    assert np.isfinite(first["suppress_loss"]).all()
    assert np.isfinite(first.loc[first["token"] == "cat", "layout_kl"]).all()  # the layout token's own column
    for method in ("divide_and_bind", "syngen", "conform", "ebama"):
        settings = anelab.methods.get(method).rescaled(50, 4)
        out = anelab.generate(pipe, PROMPT, subjects=[("cat", ["red"]), "dog"], method=settings, **FAST)
        assert len(out.trace) and np.isfinite(out.trace["loss"]).all(), method
    with pytest.raises(AnelabError, match="initno reads self-attention"):
        anelab.generate(pipe, PROMPT, TOKENS, method="initno", **FAST)


def test_the_snr_rule_scales_a_and_e_steps_by_the_flow_matching_signal(pipes):
    sd3 = pipes["tiny-sd3"]
    config = GuidanceConfig().rescaled(50, 28)
    index = plan_run(sd3, PROMPT, tokens=TOKENS, config=config)
    snr = plan_run(sd3, PROMPT, tokens=TOKENS, config=config, flow_step="snr")
    sigma = np.asarray(anelab.pipeline.flow_sigmas(sd3, 28, 256, 256))
    np.testing.assert_allclose(index.step_sizes, config.step_sizes(28))
    np.testing.assert_allclose(snr.step_sizes, config.step_sizes(28) * ((1 - sigma) ** 2 + sigma**2))
    assert sigma[0] == 1.0 and 0.5 < snr.step_sizes[14] / index.step_sizes[14] < 0.75  # the middle step is smaller


def test_blocks_are_chosen_by_index_range_or_name_and_pooled_to_16(pipes):
    flux = pipes["tiny-flux"]
    config = GuidanceConfig().rescaled(50, 4)
    read = lambda **kw: [b.name for b in plan_run(flux, PROMPT, tokens=TOKENS, config=config, **kw).guidance_layers]  # noqa: E731
    assert read() == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]  # FLUX default: double-stream
    assert read(blocks=(3,)) == ["single_transformer_blocks.1.attn"]
    assert read(blocks=("1-2",)) == ["transformer_blocks.1.attn", "single_transformer_blocks.0.attn"]
    assert read(blocks=("single_transformer_blocks.0.attn", 0)) == [
        "transformer_blocks.0.attn",
        "single_transformer_blocks.0.attn",
    ]
    big = plan_run(flux, PROMPT, tokens=TOKENS, config=config, height=512, width=512)
    assert big.guidance_layers[0].shape == (16, 16) and big.reading.native == (32, 32)  # pooled to SD 1.x's 16
    native = plan_run(flux, PROMPT, tokens=TOKENS, config=config.replace(attention_res=32), height=512, width=512)
    assert native.guidance_layers[0].shape == (32, 32)
    out = anelab.generate(flux, PROMPT, TOKENS, config=config, height=512, width=512, **FAST)
    assert np.isfinite(out.trace["loss"]).all()


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(blocks=(4,)), r"block 4 does not exist: this model has 4 blocks, indices 0\.\.3"),
        (dict(blocks=("transformer_blocks.9.attn",)), "does not exist"),
        (dict(blocks=(0, "0-1")), "name a block twice"),
        (dict(config=GuidanceConfig(attention_res=8).rescaled(50, 4)), "a transformer has no attention resolutions"),
        (dict(token_maps="clip"), "FLUX attends to T5 tokens only"),
        (dict(text_softmax="rows"), r"text_softmax must be one of \('text', 'joint'\)"),
        (dict(flow_step="sign"), "flow_step must be one of"),
        (dict(max_sequence_length=3), "beyond the T5 length 3"),
        (dict(max_sequence_length=0), "max_sequence_length must be an int in 1..512"),
        (dict(config=None, record=anelab.Record(resolutions=[8])), "Record.resolutions 8: a transformer has no"),
        (dict(record=anelab.Record(resolutions=[32])), r"the recording reads the guidance grid, 16x16"),
        (dict(fast=True), "fast=True replays CUDA graphs and needs the pipeline on a CUDA GPU"),
        (dict(height=200), "height must be a positive multiple of 16"),
    ],
)
def test_bad_transformer_input_is_one_line_naming_what_exists(pipes, options, message):
    options = dict(config=GuidanceConfig().rescaled(50, 4)) | options
    with pytest.raises(AnelabError, match=message) as error:
        plan_run(pipes["tiny-flux"], PROMPT, tokens=TOKENS, num_inference_steps=4, **options)
    assert "\n" not in str(error.value)


def test_transformer_options_are_refused_on_a_unet(tiny_pipe):
    with pytest.raises(AnelabError, match="blocks, token_maps: for SD 3 and FLUX"):
        plan_run(tiny_pipe, PROMPT, blocks=(0,), token_maps="t5")


@pytest.mark.parametrize("name", NAMES)
def test_a_saved_transformer_pipeline_loads_with_its_class(pipes, name, tmp_path):
    pipes[name].save_pretrained(tmp_path)
    loaded = anelab.load_pipeline(str(tmp_path), device="cpu")
    assert type(loaded) is type(pipes[name])
    a = anelab.generate(pipes[name], PROMPT, seeds=[4], height=256, width=256, **FAST).latents
    b = anelab.generate(loaded, PROMPT, seeds=[4], height=256, width=256, **FAST).latents
    torch.testing.assert_close(
        a, b, rtol=1e-5, atol=1e-5
    )  # memory-mapped weights may round differently in the last bit
    assert isinstance(Layer("transformer_blocks.0.attn", "joint", (16, 16)).sort_key(), tuple)


def test_thresholds_placed_by_sigma_land_at_the_step_of_equal_noise_level(pipes):
    sd3 = pipes["tiny-sd3"]
    plan = plan_run(sd3, PROMPT, tokens=TOKENS, config=GuidanceConfig(), thresholds="sigma", num_inference_steps=28)
    # A&E's 50-step loop indices 0/10/20/25 run at PNDM's t = 981/801/601/501: σ of equal SNR 0.93/0.84/0.70/0.62,
    # which SD 3's 28-step shift-3 schedule reaches at steps 5/10/15/18
    assert plan.method.thresholds == {5: 0.05, 10: 0.5, 15: 0.8} and plan.method.max_iter_to_alter == 18
    sigma = anelab.pipeline.flow_sigmas(sd3, 28, 256, 256)
    assert abs(sigma[10] - 0.837) < 0.01
    by_index = plan_run(sd3, PROMPT, tokens=TOKENS, config=GuidanceConfig(), num_inference_steps=28)
    assert by_index.method.thresholds == {0: 0.05, 10: 0.5, 20: 0.8}
    with pytest.raises(AnelabError, match=r"thresholds must be one of \('index', 'sigma'\)"):
        plan_run(sd3, PROMPT, tokens=TOKENS, config=GuidanceConfig(), thresholds="t")


def test_the_cli_generates_on_transformers_through_the_store_and_a_report_of_nothing_that_applies_refuses(tmp_path):
    import subprocess
    import sys

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "anelab", *args], capture_output=True, text=True, timeout=300, cwd=tmp_path
        )

    args = ("generate", "--model", "tiny-flux", "--prompt", PROMPT, "--tokens", "cat", "dog", "--steps", "3")
    first = run(*args, "--out", "a", "--store", "store")
    again = run(*args, "--out", "b", "--store", "store")
    assert first.returncode == again.returncode == 0, first.stderr[-2000:]
    assert "s/image" in first.stdout and "from the run store" in again.stdout
    assert (tmp_path / "a" / PROMPT / "0.png").exists()
    refused = run("report", "--model", "tiny-sd3", "--only", "01", "--out", "reports")
    assert refused.returncode == 2 and "none of the notebooks asked for applies to sd3" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "reports").exists()  # nothing written when it refuses


def test_transformer_options_enter_the_store_identity_only_when_given(pipes):
    from anelab.pipeline import Request
    from anelab.runs.runner import context_identity, request_identity

    sd3 = pipes["tiny-sd3"]
    common = context_identity(sd3, "tiny-sd3", steps=4)
    base = Request(PROMPT, seeds=(0,), num_inference_steps=4, guidance_scale=7.0, height=256, width=256)
    plain = request_identity(base, common)
    assert "transformer" not in plain and common["dtype"] == "torch.float32"
    import dataclasses

    for change in (
        dict(blocks=(0,)),
        dict(token_maps="t5"),
        dict(text_softmax="joint"),
        dict(flow_step="snr"),
        dict(thresholds="sigma"),
        dict(max_sequence_length=128),
    ):
        other = request_identity(dataclasses.replace(base, **change), common)
        assert other["transformer"] == {k: list(v) if isinstance(v, tuple) else v for k, v in change.items()}


@pytest.mark.parametrize("name", NAMES)
def test_recording_keeps_every_block_and_changes_nothing(pipes, name):
    pipe = pipes[name]
    plain = anelab.generate(pipe, PROMPT, seeds=[0, 1], **FAST)
    recorded = anelab.generate(pipe, PROMPT, TOKENS, seeds=[0, 1], record=anelab.Record(tokens="prompt"), **FAST)
    assert torch.equal(plain.latents, recorded.latents)  # the blocks keep their own output
    frame = recorded.attention.to_frame()
    blocks = [b.name for b in mmdit.blocks(pipe, 256, 256)]
    assert set(frame["layer"]) == set(blocks) | {"mean"} and set(frame["res"]) == {16}
    assert set(frame.loc[frame["layer"] != "mean", "place"]) == (
        {"joint"} if name == "tiny-sd3" else {"double", "single"}
    )
    cat = recorded.attention.maps(token="cat", step=1, seed=0, res=16, layer=blocks[-1])
    assert cat.shape == (16, 16) and float(cat.sum()) > 0
    per_block = frame[(frame["token"] == "cat") & (frame["step"] == 1) & (frame["seed"] == 0)].set_index("layer")
    assert per_block.loc[blocks, "max_attention"].nunique() == len(blocks)  # each block its own map
    guided = anelab.generate(
        pipe, PROMPT, TOKENS, config=GuidanceConfig().rescaled(50, 4), record=anelab.Record(), **FAST
    )
    assert np.isfinite(guided.attention.to_frame()["max_attention"]).all()


@pytest.mark.parametrize("name", NAMES)
def test_low_memory_on_transformers_gives_the_same_result_holding_less(pipes, name):
    from anelab.memory import HeldForBackward

    pipe = pipes[name]
    config = GuidanceConfig().rescaled(50, 4)
    normal = anelab.generate(pipe, PROMPT, TOKENS, seeds=[0, 1], config=config, **FAST)
    low = anelab.generate(pipe, PROMPT, TOKENS, seeds=[0, 1], config=config, low_memory=True, **FAST)
    torch.testing.assert_close(low.latents, normal.latents, rtol=1e-5, atol=1e-5)
    held = {}
    for flag in (False, True):
        with HeldForBackward(exclude=pipe.transformer.parameters()) as h:
            anelab.generate(
                pipe,
                PROMPT,
                TOKENS,
                config=GuidanceConfig(thresholds={}),
                low_memory=flag,
                **FAST | dict(num_inference_steps=1),
            )
        held[flag] = h.peak
    assert held[True] < 0.97 * held[False]  # measured 0.92x: the read blocks' feed-forwards are recomputed
    assert not any(isinstance(m, anelab.memory.Checkpointed) for m in pipe.transformer.modules())  # all undone


def test_the_block_question_per_family(pipes):
    import pandas as pd

    from anelab import analysis, plotting
    from anelab.blocks import block_runs

    prompts = pd.DataFrame({"prompt": [PROMPT], "tokens": [TOKENS]})
    config = GuidanceConfig(scale_factor=200.0).rescaled(50, 6)
    frame = pd.concat(
        [
            block_runs(pipes[n], prompts, [0, 1], steps=6, config=config, thresholds="index", progress=False)
            for n in NAMES
        ]
    )
    profile = analysis.block_localisation(frame)
    assert list(profile.model) == ["sd3"] * 4 + ["flux"] * 4 and list(profile.block) == [0, 1, 2, 3] * 2
    assert list(profile[profile.model == "flux"].place) == ["double", "double", "single", "single"]
    assert ((profile.lower <= profile.higher) & (profile.lower > 0)).all()
    plain = frame[(frame.variant == "sd") & (frame.layer == "transformer_blocks.1.attn") & frame.subject]
    lower = plain.groupby(["seed", "step"])["max_attention"].min().mean()
    assert abs(profile.loc[(profile.model == "sd3") & (profile.block == 1), "lower"].item() - lower) < 1e-9
    effect = analysis.transformer_guidance(frame).set_index("model")
    np.testing.assert_allclose(effect.difference, effect.a_and_e - effect.plain)
    assert effect.loc["sd3", "difference"] > 0.05  # A&E raises the neglected subject (measured +0.19 on tiny-sd3)
    assert len(plotting.block_localisation(profile).axes) == 2
    with pytest.raises(AnelabError, match="a UNet has resolutions instead"):
        block_runs(anelab.load_pipeline("tiny", device="cpu"), prompts, [0])


def test_a_transformer_report_runs_the_notebooks_that_apply_and_names_the_rest(tmp_path, monkeypatch, notes):
    from anelab import report

    ran = []

    def execute(name, out, parameters, workers):
        ran.append((name, parameters["model"]))
        return report.NotebookRun(name, True, 0.0, None, {})

    monkeypatch.setattr(report, "_execute", execute)
    results = report.run_report(model="tiny-flux", out=tmp_path / "reports", runs=tmp_path / "runs", progress=False)
    assert ran == [("06_architectures", "tiny-flux")] and [r.name for r in results] == ["06_architectures"]
    assert "flux is a transformer: skipping 00_attention_explorer, 01_reproduction" in notes.text
    with pytest.raises(AnelabError, match="none of the notebooks asked for applies to flux"):
        report.run_report(model="tiny-flux", only=["02"], out=tmp_path / "other", progress=False)
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("name", NAMES)
def test_the_fast_path_on_transformers_gives_the_eager_results_keyed_by_the_text_columns(name, monkeypatch):
    from anelab import fast

    monkeypatch.setattr(fast, "available", lambda device: True)  # the CPU stand-in of CUDA graphs
    pipe = anelab.load_pipeline(name, device="cpu")  # its own: the graphs live on its transformer
    config = GuidanceConfig(thresholds={1: 0.99}, max_iter_to_alter=3, max_refinement_steps=2)
    assert not plan_run(pipe, PROMPT, tokens=TOKENS, config=config).fast  # opt-in on transformers
    runs = {
        f: anelab.generate(pipe, PROMPT, TOKENS, seeds=[0, 1], config=config, fast=f, **FAST) for f in (True, False)
    }
    torch.testing.assert_close(runs[True].latents, runs[False].latents, rtol=1e-6, atol=1e-6)
    graphs = denoiser(pipe).__dict__["_anelab_graphs"].graphs
    assert sorted({key[0] for key in graphs}) == ["CFG forward", "guided step"]
    before = set(graphs)
    # the same CLIP positions, other T5 keys (T5 keeps the capital, in pieces): the guided step gets a graph of its own
    anelab.generate(
        pipe, "a Red cat and a dog", TOKENS, seeds=[0, 1], config=config, fast=True, **FAST
    )  # CLIP lowercases
    assert len(set(graphs) - before) >= 1


def test_the_sd3_size_stand_in_has_sd3_mediums_transformer_and_plans_on_the_meta_device():
    from anelab.stand_ins import sd3_sized_pipeline

    pipe = sd3_sized_pipeline(device="meta")  # shapes only: what the GPU check builds for real
    assert 2.0e9 < sum(p.numel() for p in pipe.transformer.parameters()) < 2.1e9
    plan = plan_run(pipe, PROMPT, tokens=TOKENS, config=GuidanceConfig(), thresholds="sigma")
    assert (plan.num_inference_steps, plan.guidance_scale, plan.reading.native) == (28, 7.0, (64, 64))
    assert len(plan.guidance_layers) == 24 and plan.guidance_layers[0].shape == (16, 16)
    assert plan.reading.columns.text_length == 77 + 256


def test_the_explorer_and_the_map_plots_read_a_transformer_recording_per_block(pipes):
    from anelab import explore, plotting

    flux = pipes["tiny-flux"]
    out = anelab.generate(
        flux, PROMPT, TOKENS, seeds=[0], num_inference_steps=3, progress=False, record=anelab.Record(tokens="prompt")
    )
    widget = explore.attention_explorer(out.attention, images=out.images)
    layers = [value for _, value in widget.controls["layer"].options]
    assert set(b.name for b in mmdit.blocks(flux, 256, 256)) <= set(layers)
    assert list(widget.controls["res"].options) == [16]
    fig = plotting.attention_grid(
        out.attention, tokens=["cat", "dog"], res=16, layer="single_transformer_blocks.1.attn"
    )
    assert (
        len(fig.axes) >= 6 and "single_transformer_blocks.1.attn" in fig.texts[0].get_text() + fig.axes[0].get_title()
    )


def test_bench_takes_a_stand_in_by_model_and_refuses_others(tmp_path):
    import subprocess
    import sys

    refused = subprocess.run(
        [sys.executable, "-m", "anelab", "bench", "--model", "tiny-sd2"], capture_output=True, text=True, cwd=tmp_path
    )
    assert refused.returncode == 2 and "bench times the stand-ins tiny, tiny-sd3, tiny-flux" in refused.stderr


def test_attention_trends_per_block(pipes):
    from anelab import plotting

    sd3 = pipes["tiny-sd3"]
    out = anelab.generate(sd3, PROMPT, TOKENS, seeds=[0, 1], record=anelab.Record(), **FAST)
    per_block = out.attention.block_stats()
    assert list(per_block) == [b.name for b in mmdit.blocks(sd3, 256, 256)]
    first = per_block["transformer_blocks.0.attn"]
    frame = out.attention.to_frame()
    want = frame[frame.layer == "transformer_blocks.0.attn"]["max_attention"].to_numpy()
    np.testing.assert_allclose(first["max_attention"].to_numpy(), want)
    fig = plotting.attention_trends(per_block)
    assert len(fig.axes) == 4  # one row per block
