"""The guided loop: parity with diffusers, batching, refinement semantics, trace, bad input."""

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

import anelab
from anelab import AnelabError, GuidanceConfig
from anelab.measure import Measure as _Measure
from anelab.pipeline import TRACE_COLUMNS, _Sampler

SMALL = dict(height=128, width=128, num_inference_steps=25, output_type="latent", progress=False)
PROMPT, TOKENS = "a cat and a dog", ["cat", "dog"]


def _port(pipe):
    from anelab.bench import port_class

    try:
        StableDiffusionAttendAndExcitePipeline = port_class()
    except AnelabError as missing:  # a diffusers without the deprecated port: nothing to compare with
        pytest.skip(str(missing))
    components = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
    port = StableDiffusionAttendAndExcitePipeline(**components, requires_safety_checker=False)
    port.set_progress_bar_config(disable=True)
    return port


def _port_latents(port, seed, res, thresholds, max_iter, size=256, steps=25):
    return port(
        PROMPT,
        token_indices=[2, 5],
        generator=torch.Generator("cpu").manual_seed(seed),
        num_inference_steps=steps,
        height=size,
        width=size,
        attn_res=(res, res),
        thresholds=thresholds,
        max_iter_to_alter=max_iter,
        output_type="latent",
    ).images


@pytest.fixture()
def classic_pipe(tiny_pipe):
    """The tiny pipeline with diffusers' classic AttnProcessor everywhere (what the port installs)."""
    original = tiny_pipe.unet.attn_processors
    tiny_pipe.unet.set_attn_processor(AttnProcessor())
    yield tiny_pipe
    tiny_pipe.unet.set_attn_processor(original)


@pytest.mark.parametrize(
    "seed, res, thresholds, max_iter",
    [(0, 8, {0: 0.05, 10: 0.5, 20: 0.8}, 15), (1, 16, {0: 0.3, 5: 0.6, 12: 0.9}, 15)],
)
def test_bitwise_parity_with_the_diffusers_port(classic_pipe, seed, res, thresholds, max_iter):
    """Same processors on the layers we do not read: the final latents are identical bit for bit."""
    ref = _port_latents(_port(classic_pipe), seed, res, thresholds, max_iter)
    config = GuidanceConfig(attention_res=res, thresholds=thresholds, max_iter_to_alter=max_iter)
    out = anelab.generate(
        classic_pipe, PROMPT, TOKENS, seeds=[seed], config=config, **(SMALL | dict(height=256, width=256))
    )
    assert out.trace.triggered.any() and (out.trace.refinement_iterations > 0).any()  # refinement was exercised
    assert torch.equal(out.latents, ref)


def test_parity_with_the_port_using_fused_attention_elsewhere(tiny_pipe):
    """Default processors: fused SDPA on unread layers differs from the port's classic attention by float noise."""
    config = GuidanceConfig(attention_res=8, thresholds={0: 0.05, 10: 0.5}, max_iter_to_alter=15)
    ref = _port_latents(_port(tiny_pipe), 0, 8, {0: 0.05, 10: 0.5}, 15)
    assert "AttnProcessor2_0" in type(next(iter(tiny_pipe.unet.attn_processors.values()))).__name__
    out = anelab.generate(tiny_pipe, PROMPT, TOKENS, seeds=[0], config=config, **(SMALL | dict(height=256, width=256)))
    assert float((out.latents - ref).abs().max() / ref.abs().max()) < 1e-4


def test_plain_sd_equals_diffusers_stable_diffusion(tiny_pipe):
    ref = tiny_pipe(
        PROMPT,
        generator=torch.Generator("cpu").manual_seed(3),
        num_inference_steps=10,
        height=128,
        width=128,
        output_type="latent",
    ).images
    out = anelab.generate(tiny_pipe, PROMPT, seeds=[3], config=None, **(SMALL | dict(num_inference_steps=10)))
    torch.testing.assert_close(out.latents, ref, rtol=1e-5, atol=1e-5)
    assert out.trace.empty and list(out.trace.columns) == TRACE_COLUMNS


@pytest.fixture(scope="module")
def tiny_pipe64():
    """fp64 copy: the tiny model's guided dynamics amplify fp32 noise (1e-6 → 1e-2 over 25 steps), fp64's stays tiny."""
    return anelab.load_pipeline("tiny", dtype=torch.float64)


def test_a_batch_of_seeds_equals_single_seed_runs(tiny_pipe64):
    config = GuidanceConfig(attention_res=4, thresholds={0: 0.3, 10: 0.7, 20: 0.9})
    batch = anelab.generate(tiny_pipe64, PROMPT, TOKENS, seeds=[0, 1, 2], config=config, **SMALL)
    assert batch.trace.groupby("seed").refinement_iterations.sum().nunique() > 1  # samples refined differently
    for k, seed in enumerate([0, 1, 2]):
        single = anelab.generate(tiny_pipe64, PROMPT, TOKENS, seeds=[seed], config=config, **SMALL)
        torch.testing.assert_close(batch.latents[k : k + 1], single.latents, rtol=1e-9, atol=1e-9)
        one = batch.trace[batch.trace.seed == seed].reset_index(drop=True)
        pd.testing.assert_frame_equal(one, single.trace, rtol=1e-9)


def test_seed_noise_is_the_cpu_generator_noise(tiny_pipe, monkeypatch):
    """With a UNet that predicts zero noise the scheduler only rescales the start, so the output shows each
    seed's initial latent: exactly the CPU generator's noise for that seed, also inside a batch."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
    from diffusers.utils.torch_utils import randn_tensor

    monkeypatch.setitem(
        tiny_pipe.unet.__dict__,
        "forward",
        lambda sample, *a, **k: UNet2DConditionOutput(sample=torch.zeros_like(sample)),
    )
    out = anelab.generate(tiny_pipe, PROMPT, seeds=[5, 7], config=None, **(SMALL | dict(num_inference_steps=3)))
    scheduler = type(tiny_pipe.scheduler).from_config(tiny_pipe.scheduler.config)
    scheduler.set_timesteps(3)
    expected = torch.cat(
        [randn_tensor((1, 4, 16, 16), generator=torch.Generator("cpu").manual_seed(s)) for s in (5, 7)]
    )
    expected = expected * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        expected = scheduler.step(torch.zeros_like(expected), t, expected).prev_sample
    torch.testing.assert_close(out.latents, expected)
    assert (out.latents[0] - out.latents[1]).abs().max() > 0.5  # the two seeds' noise differs


def test_trace_schema_and_semantics(tiny_pipe):
    config = GuidanceConfig(attention_res=4, thresholds={0: 0.3, 10: 0.99}, max_iter_to_alter=5, max_refinement_steps=3)
    out = anelab.generate(tiny_pipe, PROMPT, TOKENS, seeds=[0, 1], config=config, **SMALL)
    tr = out.trace
    assert list(tr.columns) == TRACE_COLUMNS
    # guided forwards only where the latent can change: i < 5 and the threshold step 10
    assert sorted(tr.step.unique()) == [0, 1, 2, 3, 4, 10]
    assert len(tr) == 2 * 6 * 2 and set(tr.token) == {"cat", "dog"} and set(tr.token_index) == {2, 5}
    assert (
        tr.timestep.tolist()[:2] == [out.timesteps[0]] * 2 and tr[tr.step == 10].timestep.iloc[0] == out.timesteps[10]
    )
    assert (tr.step_size > 0).all()
    assert tr[tr.step == 10].threshold.eq(0.99).all() and tr[~tr.step.isin([0, 10])].threshold.isna().all()
    assert tr[~tr.step.isin([0, 10])].reached.isna().all()
    # threshold 0.99 is never reached on the tiny model: every sample refines to the cap and fails
    at10 = tr[tr.step == 10]
    assert at10.triggered.all() and (at10.refinement_iterations == 3).all() and not at10.reached.any()
    assert at10.updated.all()  # refinement moved it even though i >= max_iter_to_alter
    # loss is the worst token's 1 - m
    per_seed_step = tr.groupby(["seed", "step"])
    np.testing.assert_allclose(per_seed_step.loss.first(), 1 - per_seed_step.max_attention.min(), rtol=1e-6)
    # final_* is the re-measure after refinement: at step 0 (threshold 0.3, weakest token ~0.01-0.1) refinement
    # lifts the tokens by ~0.2-0.6, far from float noise; final_loss is that re-measure's loss
    at0 = tr[tr.step == 0]
    assert at0.triggered.all() and (at0.final_max_attention - at0.max_attention).abs().mean() > 0.1
    np.testing.assert_allclose(per_seed_step.final_loss.first(), 1 - per_seed_step.final_max_attention.min(), rtol=1e-6)


def test_no_update_after_max_iter_to_alter_and_empty_schedule_is_plain_sd(tiny_pipe):
    plain = anelab.generate(tiny_pipe, PROMPT, seeds=[0], config=None, **SMALL)
    idle = GuidanceConfig(attention_res=4, thresholds={}, max_iter_to_alter=0)
    out = anelab.generate(tiny_pipe, PROMPT, TOKENS, seeds=[0], config=idle, **SMALL)
    assert out.trace.empty  # no guided forward at all: nothing could change
    assert torch.equal(out.latents, plain.latents)
    only_early = anelab.generate(
        tiny_pipe, PROMPT, TOKENS, seeds=[0], config=idle.replace(max_iter_to_alter=2), **SMALL
    )
    assert sorted(only_early.trace.step.unique()) == [0, 1] and only_early.trace.updated.all()
    assert not torch.equal(only_early.latents, plain.latents)


class _ScriptedSampler(_Sampler):
    """A sampler whose guided forward returns scripted losses, to check the refinement rules exactly."""

    def __init__(self, losses, config):
        self.losses, self.calls, self.method = list(losses), [], config
        self.plan = type("P", (), {"step_sizes": np.ones(51), "timesteps": list(range(51)), "subjects": ()})()
        self.nonfinite_steps = torch.zeros((), dtype=torch.long)
        self.traces = self

    def measure(self, z, t, i, rows=None, term="loss"):
        self.calls.append(z.clone())
        loss = torch.tensor([self.losses.pop(0)], dtype=torch.float64)
        terms = {"max_attention": 1 - loss[:, None], "excite": loss, "loss": loss}
        return _Measure(None, terms, {"loss": torch.ones_like(z)})

    def add(self, **row):
        self.logged = row


def _refine(losses, threshold=0.8, cap=20):
    sampler = _ScriptedSampler(losses, GuidanceConfig(max_refinement_steps=cap))
    z = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    first = sampler.measure(z, 0, 0)
    z, end, triggered, iterations = sampler.refine(z, 0, 0, first, threshold, cap, alpha=1.0, need_final_grad=True)
    return sampler, z, end, triggered, iterations


def test_refinement_exit_rule_uses_the_loss_measured_before_each_update():
    # target = 1 - 0.8 = 0.2; losses at z0 (first), z1, z2, z3 (re-measure)
    sampler, z, end, triggered, iterations = _refine([0.9, 0.5, 0.1, 0.05])
    # it 1: L(z0)=0.9 → step, go on; it 2: L(z1)=0.5 → step, go on; it 3: L(z2)=0.1 → step, stop; re-measure z3
    assert triggered.item() and iterations.item() == 3
    assert z.item() == -3.0  # three steps of -alpha * grad
    assert len(sampler.calls) == 4  # first + z1 + z2 + re-measure at z3 (the official redundant forward is skipped)
    assert end.terms["excite"].item() == pytest.approx(0.05) and end.gradient() is not None


def test_refinement_stops_at_the_cap_and_skips_zero_loss_updates():
    _, z, end, _, iterations = _refine([0.9] * 10, cap=4)
    assert iterations.item() == 4 and z.item() == -4.0 and end.terms["excite"].item() == pytest.approx(0.9)
    _, z, _, _, iterations = _refine([0.9, 0.0, 0.0])  # L = 0 at z1: counted iteration, no step
    assert iterations.item() == 2 and z.item() == -1.0


def test_below_threshold_no_refinement():
    sampler, z, end, triggered, iterations = _refine([0.1])
    assert not triggered.item() and iterations.item() == 0 and len(sampler.calls) == 1 and z.item() == 0


def test_zero_loss_means_no_regular_update():
    sampler = _ScriptedSampler([0.0], GuidanceConfig(thresholds={}))
    z = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    assert sampler.guide(z, 0, 0).item() == 0.0
    assert not sampler.logged["updated"].item()


def test_processors_are_restored_after_a_run_and_after_a_failure(tiny_pipe, monkeypatch):
    before = dict(tiny_pipe.unet.attn_processors)
    anelab.generate(
        tiny_pipe,
        PROMPT,
        TOKENS,
        seeds=[0],
        config=GuidanceConfig(attention_res=4, thresholds={}, max_iter_to_alter=2),
        **SMALL,
    )
    assert tiny_pipe.unet.attn_processors == before

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("anelab.methods.attend_and_excite.excite_loss", boom)
    with pytest.raises(RuntimeError, match="boom"):
        anelab.generate(tiny_pipe, PROMPT, TOKENS, seeds=[0], config=GuidanceConfig(attention_res=4), **SMALL)
    assert tiny_pipe.unet.attn_processors == before
    assert not any(p.requires_grad for p in tiny_pipe.unet.parameters())


def test_only_the_guidance_layers_materialise_attention_and_the_guided_forward_stops_after_them(tiny_pipe, monkeypatch):
    import anelab.hooks as hk

    seen = []
    real = hk._probs  # where any probability is materialised (the stop layer: its probabilities only)
    monkeypatch.setattr(hk, "_probs", lambda attn, *a, **k: seen.append(attn) or real(attn, *a, **k))
    last_block_calls = []
    handle = tiny_pipe.unet.up_blocks[3].register_forward_hook(lambda *args: last_block_calls.append(1))
    try:
        config = GuidanceConfig(attention_res=8, thresholds={}, max_iter_to_alter=1)
        out = anelab.generate(
            tiny_pipe, PROMPT, TOKENS, seeds=[0], config=config, **(SMALL | dict(num_inference_steps=3))
        )
    finally:
        handle.remove()
    names = {name for name, module in tiny_pipe.unet.named_modules() for a in seen if module is a}
    # at 128 px (latent 16) the 8×8 cross-attention layers are down_blocks.1 and up_blocks.2
    assert names == {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.2.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.2.attentions.1.transformer_blocks.0.attn2",
    }
    assert len(seen) == 3  # one guided forward (step 0) × three layers; CFG forwards stay fused
    assert len(last_block_calls) == len(out.timesteps)  # only CFG forwards reach the last up block


def test_images_are_decoded(tiny_pipe):
    out = anelab.generate(
        tiny_pipe, PROMPT, TOKENS, seeds=[0, 1], config=None, **(SMALL | dict(output_type="pil", num_inference_steps=2))
    )
    assert len(out.images) == 2 and out.images[0].size == (128, 128)
    assert out.latents.shape == (2, 4, 16, 16) and out.seconds > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tokens=["cow"]), "'cow' is not a token"),
        (dict(tokens=["a"]), "appears 2 times"),
        (dict(tokens=[0]), "token position 0"),
        (dict(tokens=[6]), "token position 6"),
        (
            dict(config=GuidanceConfig(attention_res=64)),
            r"attention_res 64 does not exist at 128x128: this model has cross-attention at resolutions \[16, 8, 4, 2\]",
        ),
        (dict(config=GuidanceConfig(attention_res=2, kernel_size=5)), "kernel_size 5 is too large for 2x2"),
        (dict(num_inference_steps=5), r"threshold steps \[10, 20\] are beyond the schedule: it has 6 loop iterations"),
        (dict(num_inference_steps=0), "num_inference_steps must be an int >= 1"),
        (dict(seeds=[]), "seeds must be a non-empty list"),
        (dict(seeds=[1, 1]), r"seeds must be distinct; repeated: \[1\]"),
        (dict(seeds=[-1]), "seeds must be ints with 0 <= seed"),
        (dict(prompt="cat " * 80), "prompt is 82 tokens long"),
        (dict(height=100), "height must be a positive multiple of 8"),
        (dict(output_type="jpg"), "output_type must be one of"),
        (dict(tokens=[]), "guidance needs subject tokens"),
        (dict(config={"attention_res": 16}), "config must be a method.s settings \\(a GuidanceConfig for A&E"),
    ],
)
def test_bad_input_fails_before_denoising(tiny_pipe, kwargs, message, monkeypatch):
    monkeypatch.setattr(_Sampler, "run", lambda *a, **k: pytest.fail("denoising started"))
    args = dict(prompt=PROMPT, tokens=TOKENS, seeds=[0], config=GuidanceConfig(attention_res=4)) | SMALL | kwargs
    with pytest.raises(AnelabError, match=message):
        anelab.generate(tiny_pipe, **args)


def test_a_non_finite_gradient_leaves_that_sample_unmoved_and_is_flagged(tiny_pipe, monkeypatch):
    """fp16 safety: a NaN objective for one sample zeroes its gradient; the others are guided as usual."""
    import anelab.methods.attend_and_excite as pipeline

    original = pipeline.excite_loss

    def poisoned(m):
        loss = original(m)
        return (
            torch.where(torch.arange(len(loss)) == 1, torch.full_like(loss, float("nan")), loss)
            if len(loss) == 2
            else loss
        )

    config = GuidanceConfig(attention_res=8, thresholds={}, max_iter_to_alter=3)
    clean = anelab.generate(tiny_pipe, PROMPT, TOKENS, seeds=[0, 1], config=config, **SMALL)
    monkeypatch.setattr(pipeline, "excite_loss", poisoned)
    with pytest.warns(UserWarning, match="non-finite A&E gradient"):
        out = anelab.generate(tiny_pipe, PROMPT, TOKENS, seeds=[0, 1], config=config, **SMALL)
    flagged = out.trace.groupby("seed").nonfinite.all()
    assert flagged.to_dict() == {0: False, 1: True}
    torch.testing.assert_close(out.latents[0], clean.latents[0])
    plain = anelab.generate(tiny_pipe, PROMPT, TOKENS, seeds=[1], **SMALL)
    torch.testing.assert_close(out.latents[1], plain.latents[0], rtol=1e-4, atol=1e-4)  # never moved: plain SD


def test_a_non_finite_latent_is_a_clear_error(tiny_pipe):
    config = GuidanceConfig(attention_res=8, thresholds={}, max_iter_to_alter=2, scale_factor=1e38)
    with pytest.raises(AnelabError, match=r"became NaN/inf \(first at loop index 0, .* run in float32"):
        anelab.generate(tiny_pipe, PROMPT, TOKENS, seeds=[0], config=config, **SMALL)
