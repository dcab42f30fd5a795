"""The tiny offline pipeline and the loading of real (here: saved tiny) pipelines."""

import numpy as np
import pytest
import torch

import anelab
from anelab import AnelabError, GuidanceConfig
from anelab.hooks import cross_attention_layers


def test_tiny_pipeline_has_sd1_shaped_cross_attention(tiny_pipe):
    at_512 = {(layer.place, layer.res) for layer in cross_attention_layers(tiny_pipe.unet, 64, 64)}
    assert at_512 == {("down", 64), ("down", 32), ("down", 16), ("mid", 8), ("up", 16), ("up", 32), ("up", 64)}
    at_256 = {layer.res for layer in cross_attention_layers(tiny_pipe.unet, 32, 32)}
    assert at_256 == {32, 16, 8, 4}
    assert type(tiny_pipe.scheduler).__name__ == "PNDMScheduler"
    tiny_pipe.scheduler.set_timesteps(50)
    ts = tiny_pipe.scheduler.timesteps.tolist()
    assert len(ts) == 51 and ts[:3] == [981, 961, 961] and ts[-1] == 1  # reference §1.7
    assert tiny_pipe.tokenizer.model_max_length == 77 and tiny_pipe.tokenizer.pad_token == "<|endoftext|>"
    assert not any(p.requires_grad for p in tiny_pipe.unet.parameters())


def test_tiny_attention_responds_to_guidance(tiny_pipe):
    """At the default thresholds refinement triggers at some threshold steps and not at others, lifts the weakest
    token where it runs, and guidance lowers the loss (256 px: the 8×8 layers are the ones that are 16×16 at 512 px).
    All on averages with wide margins: single samples sit close to a threshold on some CPUs."""
    out = anelab.generate(
        tiny_pipe,
        "a cat and a dog",
        ["cat", "dog"],
        seeds=[0, 1, 2, 3],
        config=GuidanceConfig(attention_res=8),
        height=256,
        width=256,
        output_type="latent",
        progress=False,
    )
    per_pair = out.trace.groupby(["seed", "step"]).agg(
        threshold=("threshold", "first"),
        triggered=("triggered", "first"),
        first=("max_attention", "min"),
        final=("final_max_attention", "min"),
    )
    at_thresholds = per_pair[per_pair.threshold.notna()]
    assert 0 < at_thresholds.triggered.mean() < 1  # here: never at step 0 (margin >= 0.1), always at step 20 (>= 0.15)
    refined = at_thresholds[at_thresholds.triggered]
    assert (refined.final - refined.first).mean() > 0.02  # here 0.04-0.05
    loss = out.trace.groupby("step").loss.mean()
    assert loss[24] < loss[0] - 0.1  # guidance lowered the loss (here 0.70 -> 0.39)


def test_saved_pipeline_loads_and_gives_the_same_images(tiny_pipe, tmp_path):
    """The saved weights come back bit for bit; the outputs agree to float noise (the loaded, memory-mapped
    weights may take other vectorised code paths, so outputs are compared with a tolerance)."""
    tiny_pipe.save_pretrained(tmp_path / "model")
    loaded = anelab.load_pipeline(str(tmp_path / "model"), device="cpu")
    for name in ("unet", "vae", "text_encoder"):
        mine, theirs = getattr(tiny_pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
    public = [{k: v for k, v in p.scheduler.config.items() if not k.startswith("_")} for p in (tiny_pipe, loaded)]
    assert public[0] == public[1] and loaded.tokenizer.get_vocab() == tiny_pipe.tokenizer.get_vocab()
    args = dict(seeds=[0], height=128, width=128, num_inference_steps=5, output_type="latent", progress=False)
    plain = [anelab.generate(p, "a cat and a dog", config=None, **args).latents for p in (tiny_pipe, loaded)]
    torch.testing.assert_close(*plain, rtol=1e-5, atol=1e-5)
    # guided: compare the first measurement (later ones amplify float noise)
    guided = [
        anelab.generate(
            p, "a cat and a dog", ["cat", "dog"], config=GuidanceConfig(attention_res=4, thresholds={}), **args
        ).trace
        for p in (tiny_pipe, loaded)
    ]
    first = [g[g.step == 0].max_attention.to_numpy() for g in guided]
    np.testing.assert_allclose(*first, rtol=1e-4)
    assert anelab.load_pipeline(loaded) is loaded  # a built pipeline is accepted as is


def test_loading_with_a_dtype(tmp_path, tiny_pipe):
    tiny_pipe.save_pretrained(tmp_path / "model")
    half = anelab.load_pipeline(tmp_path / "model", device="cpu", dtype=torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16
    named = anelab.load_pipeline(
        tmp_path / "model", device="cpu", dtype="bf16"
    )  # names, as notebook parameters give them
    assert named.unet.dtype == torch.bfloat16
    with pytest.raises(
        AnelabError,
        match="dtype must be one of \\['bf16', 'bfloat16', 'float16', 'float32', 'fp16', 'fp32'\\] or a torch.dtype, got 'half'",
    ):
        anelab.load_pipeline("tiny", dtype="half")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("/no/such/model", "diffusers pipeline directory '/no/such/model' does not exist"),
        (
            "nobody/no-such-model",
            "'nobody/no-such-model' is not a local directory and is not in the Hugging Face cache, and the Hub cannot be reached",
        ),
        (3, "model must be 'tiny', a Hub id, a local directory or a pipeline \\(StableDiffusionPipeline"),
    ],
)
def test_unloadable_models_give_one_clear_error(spec, message):
    with pytest.raises(AnelabError, match=message) as info:
        anelab.load_pipeline(spec)
    assert "\n" not in str(info.value)


def test_a_directory_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(AnelabError, match="not a saved diffusers pipeline"):
        anelab.load_pipeline(str(tmp_path))
