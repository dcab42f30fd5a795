"""`generate` beyond its defaults: half precision, non-square images, output types, no CFG, the steering
knobs, and the CLI flags that reach them. Tiny model, 128-256 px, a few steps."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import anelab
from anelab import GuidanceConfig, Record
from anelab.cli import main

PROMPT, TOKENS = "a cat and a dog", ["cat", "dog"]
FAST = dict(seeds=[0, 1], height=128, width=128, num_inference_steps=4, output_type="latent", progress=False)
# threshold 0.99 is far above any attention the tiny model reaches: refinement always runs, to its cap
REFINING = GuidanceConfig(attention_res=8, thresholds={0: 0.99}, max_iter_to_alter=3, max_refinement_steps=2)


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture(scope="module")
def bf16_pipe():
    return anelab.load_pipeline("tiny", dtype=torch.bfloat16)


# -- precision -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.08), (torch.float16, 0.02)], ids=["bf16", "fp16"])
def test_guided_generation_in_half_precision(tiny_pipe, bf16_pipe, dtype, tolerance):
    """The guided loop (refinement included) runs in the weights' dtype, stays finite and decodes, and its first
    attention measurement (before any update) agrees with fp32's to that dtype's accuracy (here bf16 0.02, fp16 0.002)."""
    pipe = bf16_pipe if dtype == torch.bfloat16 else anelab.load_pipeline("tiny", dtype=dtype)
    out = anelab.generate(pipe, PROMPT, TOKENS, config=REFINING, **(FAST | dict(output_type="np")))
    ref = anelab.generate(tiny_pipe, PROMPT, TOKENS, config=REFINING, **FAST)
    assert out.latents.dtype == dtype and torch.isfinite(out.latents).all()
    assert out.images.shape == (2, 128, 128, 3) and np.isfinite(out.images).all() and out.images.std() > 0.01
    trace = out.trace
    assert (
        not trace.nonfinite.any() and (trace[trace.step == 0].refinement_iterations == 2).all() and trace.updated.all()
    )
    first, first32 = (t[t.step == 0].max_attention.to_numpy() for t in (trace, ref.trace))
    np.testing.assert_allclose(first, first32, atol=tolerance)


# -- shapes and output types ---------------------------------------------------------------------
def test_non_square_images_give_non_square_grids(tiny_pipe):
    """256×192 (h×w): latents 32×24, the loss reads the 16×12 grids (res = width), the layout target and
    the recorded maps have that shape, and the layout term enters the objective."""
    config = REFINING.replace(attention_res=12)
    record = Record(resolutions=(12, 6), steps=[0, 1], dtype=torch.float32)
    out = anelab.generate(
        tiny_pipe,
        PROMPT,
        ["cat"],
        config=config,
        layout={"dog": (0.8, 0.2)},
        record=record,
        **(FAST | dict(seeds=[0], height=256, width=192, output_type="pil")),
    )
    assert out.latents.shape == (1, 4, 32, 24) and out.images[0].size == (192, 256)
    assert out.attention.maps(token="cat", step=0, res=12).shape == (16, 12)
    assert out.attention.maps(token="dog", step=1, res=6).shape == (8, 6)
    trace = out.trace
    assert sorted(trace.step.unique()) == [0, 1, 2] and np.isfinite(trace.max_attention).all()
    kl = trace.query("token == 'dog'").layout_kl
    assert kl.notna().all() and (kl > 0).all() and trace.query("token == 'cat'").layout_kl.isna().all()
    np.testing.assert_allclose(
        trace.objective, trace.loss + trace.groupby(["seed", "step"]).layout_kl.transform("sum"), rtol=1e-5
    )


def test_output_types_hold_the_same_image(tiny_pipe):
    """ "np" is [n, h, w, 3] floats in [0, 1], "pt" the same values as [n, 3, h, w], "pil" those values rounded to 8 bits."""
    images = {
        kind: anelab.generate(
            tiny_pipe, PROMPT, config=None, **(FAST | dict(num_inference_steps=2, output_type=kind))
        ).images
        for kind in ("pil", "np", "pt")
    }
    array, tensor, pil = images["np"], images["pt"], images["pil"]
    assert isinstance(array, np.ndarray) and array.shape == (2, 128, 128, 3) and 0 <= array.min() and array.max() <= 1
    assert array.std() > 0.01  # a picture, not a constant
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (2, 3, 128, 128)
    np.testing.assert_allclose(tensor.permute(0, 2, 3, 1).numpy(), array, atol=1e-6)
    assert isinstance(pil, list) and [(im.size, im.mode) for im in pil] == [((128, 128), "RGB")] * 2
    np.testing.assert_allclose(np.stack([np.asarray(im) for im in pil]) / 255, array, atol=0.5 / 255 + 1e-6)


# -- classifier-free guidance --------------------------------------------------------------------
def test_guidance_scale_at_most_one_is_one_conditional_forward(tiny_pipe):
    """guidance_scale <= 1 turns CFG off, as in diffusers: each step is one conditional forward of the batch,
    so 1.0 and 0.5 give the same latents, 1.0 matches diffusers' pipeline, and the recorder then watches
    that forward (at step 0 its statistics equal the conditional half of a CFG run's)."""
    batches = []
    handle = tiny_pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    record = Record(resolutions=(8,), steps=[0], dtype=torch.float32)
    try:
        runs = {
            scale: anelab.generate(tiny_pipe, PROMPT, TOKENS, config=None, guidance_scale=scale, record=record, **FAST)
            for scale in (1.0, 0.5, 7.5)
        }
    finally:
        handle.remove()
    n = len(runs[1.0].timesteps)
    assert batches == [2] * n + [2] * n + [4] * n  # seeds [0, 1]: the CFG run doubles the batch
    assert torch.equal(runs[1.0].latents, runs[0.5].latents)
    assert _relative_difference(runs[1.0].latents, runs[7.5].latents) > 0.1
    diffusers_latents = torch.cat(
        [
            tiny_pipe(
                PROMPT,
                generator=torch.Generator("cpu").manual_seed(s),
                guidance_scale=1.0,
                num_inference_steps=4,
                height=128,
                width=128,
                output_type="latent",
            ).images
            for s in (0, 1)
        ]
    )
    torch.testing.assert_close(runs[1.0].latents, diffusers_latents, rtol=1e-5, atol=1e-5)
    stats = [
        runs[scale].attention.stats().sort_values(["seed", "token"]).max_attention.to_numpy() for scale in (1.0, 7.5)
    ]
    np.testing.assert_allclose(*stats, rtol=1e-4)


def test_guided_generation_without_cfg(tiny_pipe):
    """A&E with guidance_scale 1: the guided forward is conditional in both cases, so the step-0 measurement is the
    CFG run's; the results differ afterwards."""
    no_cfg = anelab.generate(tiny_pipe, PROMPT, TOKENS, config=REFINING, guidance_scale=1.0, **FAST)
    cfg = anelab.generate(tiny_pipe, PROMPT, TOKENS, config=REFINING, **FAST)
    first = [out.trace[out.trace.step == 0].max_attention.to_numpy() for out in (no_cfg, cfg)]
    np.testing.assert_allclose(*first, rtol=1e-5)
    assert no_cfg.trace.updated.all() and _relative_difference(no_cfg.latents, cfg.latents) > 0.1


# -- steering knobs inside generate ---------------------------------------------------------------
STEERING = dict(tokens=["cat"], suppress=["dog"], layout={"cat": (0.25, 0.5)})
# suppress_bound 0: the suppression term is never switched off, so suppress_scale always matters
BASE = REFINING.replace(suppress_bound=0.0)


@pytest.fixture(scope="module")
def steered_default(tiny_pipe):
    return anelab.generate(tiny_pipe, PROMPT, config=BASE, **STEERING, **FAST)


@pytest.mark.parametrize(
    "change, column",
    [
        (dict(suppress_scale=2.5), "objective"),
        (dict(layout_scale=0.3), "objective"),
        (dict(layout_sigma=0.05), "layout_kl"),
        (dict(sigma_convention="standard"), "max_attention"),
    ],
    ids=["suppress_scale", "layout_scale", "layout_sigma", "sigma_convention"],
)
def test_each_steering_knob_changes_the_result(tiny_pipe, steered_default, change, column):
    """Each knob changes the first measurement it enters (same latent, so no float noise is amplified there)
    and the final latents, both by far more than float noise."""
    out = anelab.generate(tiny_pipe, PROMPT, config=BASE.replace(**change), **STEERING, **FAST)
    first = [o.trace[o.trace.step == 0][column].dropna().to_numpy() for o in (out, steered_default)]
    assert np.abs(first[0] - first[1]).max() > 1e-2
    assert _relative_difference(out.latents, steered_default.latents) > 1e-2


def test_the_two_stage_layout_update_moves_by_the_kl_first_then_by_a_and_e(tiny_pipe, steered_default):
    """layout_update="two_stage" (the original study): the KL gradient moves the latent first and the A&E objective is
    measured at L + δ, so the objective it descends holds no layout term, each regular step costs one more guided
    forward, and the result differs from the joint update's by far more than float noise."""
    calls = []
    handle = tiny_pipe.unet.register_forward_pre_hook(
        lambda m, a, k: calls.append((a[0] if a else k["sample"]).shape[0]), with_kwargs=True
    )
    try:
        two = anelab.generate(tiny_pipe, PROMPT, config=BASE.replace(layout_update="two_stage"), **STEERING, **FAST)
    finally:
        handle.remove()
    rows = two.trace.drop_duplicates(["seed", "step"])
    np.testing.assert_allclose(rows.objective, rows.loss + rows.suppress_loss.fillna(0), rtol=1e-6)  # no layout term
    assert two.trace.layout_kl.notna().any()  # the KL is still measured and traced
    joint_rows = steered_default.trace.drop_duplicates(["seed", "step"])
    assert (
        joint_rows.objective - joint_rows.loss - joint_rows.suppress_loss.fillna(0)
    ).abs().max() > 1e-3  # joint: it is there
    assert _relative_difference(two.latents, steered_default.latents) > 1e-2
    regular = BASE.last_update_iteration(5)
    assert (
        sum(1 for n in calls if n == 2) >= 2 * regular
    )  # guided forwards (batch 2): a measure and an A&E measure per step
    with pytest.raises(anelab.AnelabError, match="layout_update must be one of"):
        BASE.replace(layout_update="sequential")


# -- the CLI -------------------------------------------------------------------------------------
def _cli(out, *options):
    with pytest.raises(SystemExit) as done:
        main(
            [
                "generate",
                "--prompt",
                PROMPT,
                "--tokens",
                "cat",
                "dog",
                "--seeds",
                "0",
                "--steps",
                "4",
                "--height",
                "128",
                "--width",
                "128",
                "--attention-res",
                "8",
                "--thresholds",
                "0:0.99",
                "--max-iter-to-alter",
                "3",
                "--out",
                str(out),
                *options,
            ]
        )
    assert done.value.code == 0
    return np.asarray(Image.open(out / PROMPT / "0.png"), dtype=np.int16), pd.read_parquet(out / "trace.parquet")


def _pixels(out) -> np.ndarray:
    return np.asarray(out.images[0], dtype=np.int16)


def test_cli_plain_guidance_scale_and_dtype_reach_generate(tiny_pipe, bf16_pipe, tmp_path):
    """--plain, --guidance-scale and --dtype give the images that generate gives with the same settings (within one
    8-bit level), and each image differs clearly from the default run's (here by 6-18 levels on average)."""
    args = dict(seeds=[0], height=128, width=128, num_inference_steps=4, progress=False)
    guided = GuidanceConfig(attention_res=8, thresholds={0: 0.99}, max_iter_to_alter=3)
    default, trace = _cli(tmp_path / "default")
    assert np.abs(default - _pixels(anelab.generate(tiny_pipe, PROMPT, TOKENS, config=guided, **args))).max() <= 1
    assert trace[trace.step == 0].triggered.all() and trace.updated.all()
    cases = {
        "plain": (["--plain"], anelab.generate(tiny_pipe, PROMPT, TOKENS, config=None, **args)),
        "scale": (
            ["--guidance-scale", "1.0"],
            anelab.generate(tiny_pipe, PROMPT, TOKENS, config=guided, guidance_scale=1.0, **args),
        ),
        "bf16": (["--dtype", "bf16"], anelab.generate(bf16_pipe, PROMPT, TOKENS, config=guided, **args)),
    }
    for name, (options, expected) in cases.items():
        image, trace = _cli(tmp_path / name, *options)
        assert np.abs(image - _pixels(expected)).max() <= 1, name
        assert np.abs(image - default).mean() > 2, name  # far from the default run's image
        assert trace.step.isna().all() == (name == "plain"), name  # --plain: no guided step (one row records the run)
