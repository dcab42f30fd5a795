"""Attention recording: what is recorded, that it matches direct computation and the trace, the cache files."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import anelab
from anelab import AnelabError, GuidanceConfig, Record
from anelab.cache import FRAME_COLUMNS, AttentionCache, short_layer_name
from anelab.hooks import attention_capture, cross_attention_layers

PROMPT, TOKENS = "a cat and a dog", ["cat", "dog"]
FAST = dict(height=128, width=128, num_inference_steps=10, output_type="latent", progress=False)


@pytest.fixture(scope="module")
def recorded_512(tiny_pipe):
    """Plain SD at 512x512, two seeds, every prompt token, all four resolutions, fp32 maps."""
    record = Record(resolutions=(8, 16, 32, 64), steps=[0, 2], tokens="prompt", dtype=torch.float32)
    return anelab.generate(
        tiny_pipe,
        PROMPT,
        TOKENS,
        seeds=[0, 1],
        record=record,
        height=512,
        width=512,
        num_inference_steps=3,
        output_type="latent",
        progress=False,
    )


def test_maps_have_the_right_shapes_at_all_four_resolutions(recorded_512):
    cache = recorded_512.attention
    assert cache.resolutions == [64, 32, 16, 8] and cache.steps == [0, 2]
    assert list(cache.tokens.values()) == ["a", "cat", "and", "a", "dog", "<eot>"]
    for layer in cache.layers:
        assert layer.shape == (layer.res, layer.res)
        for step in cache.steps:
            assert cache[step, layer.name].shape == (2, layer.res, layer.res, 6)
    assert {layer.place for layer in cache.layers_at(8)} == {"mid"}
    assert len(cache) == 2 * len(cache.layers)
    assert cache.nbytes == 2 * 2 * sum(x.res**2 for x in cache.layers) * 6 * 4  # seeds x steps x Σhw x tokens x fp32


def test_recorded_probabilities_sum_to_at_most_one_over_tokens(recorded_512):
    cache = recorded_512.attention
    for key in cache.keys():
        total = cache[key].sum(dim=-1)
        assert (total <= 1 + 1e-5).all() and (cache[key] >= 0).all()


def test_recorded_map_equals_a_conditional_only_forward_at_the_same_latent(tiny_pipe, recorded_512):
    """Step 0's latent is the seeds' initial noise; recompute the conditional attention directly."""
    from diffusers.utils.torch_utils import randn_tensor

    pipe, cache = tiny_pipe, recorded_512.attention
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(3)
    noise = torch.cat([randn_tensor((1, 4, 64, 64), generator=torch.Generator("cpu").manual_seed(s)) for s in (0, 1)])
    z = scheduler.scale_model_input(noise * scheduler.init_noise_sigma, scheduler.timesteps[0])
    cond = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0].expand(2, -1, -1)
    layers = cross_attention_layers(pipe.unet, 64, 64)
    seen = {}
    with torch.no_grad(), attention_capture(pipe.unet, layers) as hooks:
        with hooks.reading({layer.name: lambda name, p: seen.__setitem__(name, p) for layer in layers}):
            pipe.unet(z, scheduler.timesteps[0], encoder_hidden_states=cond)
    positions = list(cache.tokens)
    for layer in layers:
        direct = seen[layer.name].mean(dim=1).unflatten(1, layer.shape)[..., positions]
        torch.testing.assert_close(cache[0, layer.name], direct, atol=1e-6, rtol=1e-4)
    res16 = cache.layers_at(16)
    mean16 = sum(seen[x.name].sum(1) for x in res16) / sum(seen[x.name].shape[1] for x in res16)
    torch.testing.assert_close(
        cache.maps(token="dog", step=0, res=16, seed=1), mean16[1, :, 5].reshape(16, 16), atol=1e-6, rtol=1e-4
    )


def test_stats_cover_every_seed_step_resolution_and_token(recorded_512):
    cache = recorded_512.attention
    frame, stats = cache.to_frame(), cache.stats()
    assert list(frame.columns) == FRAME_COLUMNS
    assert len(stats) == 2 * 2 * 4 * 6  # seeds x steps x resolutions x tokens
    assert len(frame) == len(stats) + 2 * 2 * len(cache.layers) * 6
    assert set(stats.res) == {8, 16, 32, 64} and stats[["max_attention", "raw_max", "mass"]].notna().all().all()
    assert stats.query("token in ['cat', 'dog']").subject.all() and not stats.query("token == 'and'").subject.any()
    assert ((stats.raw_max >= stats.mass) & (stats.max_attention <= 1)).all()
    assert set(frame.query("layer == 'mean' and res == 16").place) == {"down+up"}


def test_at_the_guidance_resolution_recorded_smoothed_max_equals_the_trace(tiny_pipe):
    """Threshold steps with threshold 0 never update the latent: the CFG forward then sees the measured latent."""
    config = GuidanceConfig(attention_res=8, thresholds={0: 0.0, 4: 0.0, 7: 0.0}, max_iter_to_alter=0)
    out = anelab.generate(
        tiny_pipe,
        PROMPT,
        TOKENS,
        seeds=[0, 3],
        config=config,
        record=Record(resolutions=(8, 4), maps=False),
        **(FAST | dict(height=256, width=256)),
    )
    trace = out.trace.set_index(["seed", "step", "token"])
    assert len(trace) == 2 * 3 * 2 and not trace.updated.any()
    stats = out.attention.stats().query("res == 8").set_index(["seed", "step", "token"])
    recorded = stats.loc[trace.index, "max_attention"]
    np.testing.assert_allclose(recorded.to_numpy(), trace.max_attention.to_numpy(), rtol=1e-5, atol=1e-6)


def test_recording_leaves_samples_bit_identical(tiny_pipe):
    config = GuidanceConfig(attention_res=8, max_iter_to_alter=5, thresholds={0: 0.05, 3: 0.9})
    kwargs = dict(seeds=[0, 1], config=config) | FAST
    plain = anelab.generate(tiny_pipe, PROMPT, TOKENS, **kwargs)
    recorded = anelab.generate(tiny_pipe, PROMPT, TOKENS, record=Record(resolutions=(16, 8, 4, 2)), **kwargs)
    assert torch.equal(plain.latents, recorded.latents)
    pd.testing.assert_frame_equal(plain.trace, recorded.trace)


def test_sd_run_records_with_cfg_off_and_a_token_list(tiny_pipe):
    out = anelab.generate(
        tiny_pipe,
        PROMPT,
        seeds=[2],
        guidance_scale=1.0,
        record=Record(resolutions=16, steps=[1, 3], tokens=["dog", 1]),
        **FAST,
    )
    cache = out.attention
    assert cache.steps == [1, 3] and cache.tokens == {5: "dog", 1: "a"} and cache.subjects == []
    assert cache.timesteps == {1: out.timesteps[1], 3: out.timesteps[3]}
    assert cache.maps(token="dog", step=3, res=16).shape == (16, 16)


def test_eot_outside_the_prompt_softmax_has_no_smoothed_max(tiny_pipe):
    config = GuidanceConfig(softmax_tokens="prompt", attention_res=8, thresholds={0: 0.05})
    out = anelab.generate(
        tiny_pipe,
        PROMPT,
        TOKENS,
        config=config,
        record=Record(resolutions=8, steps=[0], tokens="prompt", maps=False),
        **FAST,
    )
    stats = out.attention.stats().set_index("token")
    assert np.isnan(stats.loc["<eot>", "max_attention"]) and stats.drop(index="<eot>").max_attention.notna().all()
    assert stats.loc["<eot>", "raw_max"] > 0


def test_maps_false_keeps_statistics_only(tiny_pipe):
    out = anelab.generate(tiny_pipe, PROMPT, TOKENS, record=Record(maps=False, resolutions=(16, 8)), **FAST)
    cache = out.attention
    assert not cache.has_maps and cache.nbytes == 0 and len(cache.stats()) == 11 * 2 * 2
    with pytest.raises(AnelabError, match="maps=False"):
        cache.maps(token="cat", step=0, res=16)


def test_layer_mean_is_the_head_weighted_mean_of_its_layers(recorded_512):
    cache = recorded_512.attention
    layers = cache.layers_at(32)
    by_layer = [cache.maps(token="cat", step=2, layer=x.name, seed=0) for x in layers]
    torch.testing.assert_close(cache.maps(token="cat", step=2, res=32, seed=0), torch.stack(by_layer).mean(0))


def test_cache_questions_with_wrong_answers_get_clear_errors(recorded_512):
    cache = recorded_512.attention
    with pytest.raises(AnelabError, match="pass seed="):
        cache.maps(token="cat", step=0, res=16)
    with pytest.raises(AnelabError, match="recorded steps are \\[0, 2\\]"):
        cache.maps(token="cat", step=1, res=16, seed=0)
    with pytest.raises(AnelabError, match="recorded tokens are 1:a 2:cat"):
        cache.maps(token="bird", step=0, res=16, seed=0)
    with pytest.raises(AnelabError, match="recorded resolutions are \\[64, 32, 16, 8\\]"):
        cache.maps(token="cat", step=0, res=4, seed=0)
    with pytest.raises(AnelabError, match="is at resolution 8, not 16"):
        cache.maps(token="cat", step=0, res=16, layer=cache.layers_at(8)[0].name, seed=0)


def test_save_load_round_trip_is_exact(recorded_512, tmp_path):
    cache = recorded_512.attention
    cache.save(tmp_path / "cache")
    again = AttentionCache.load(tmp_path / "cache")
    assert list(again.keys()) == list(cache.keys())
    assert all(torch.equal(again[key], cache[key]) and again[key].dtype == cache[key].dtype for key in cache.keys())
    pd.testing.assert_frame_equal(again.to_frame(), cache.to_frame())
    for attribute in ("prompt", "seeds", "tokens", "subjects", "timesteps", "layers", "heads", "meta"):
        assert getattr(again, attribute) == getattr(cache, attribute), attribute
    cache.save(tmp_path / "cache")  # overwriting a cache is fine
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(AnelabError, match="not an attention cache"):
        cache.save(tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "other"]  # no temporary left behind
    with pytest.raises(AnelabError, match="not a saved attention cache"):
        AttentionCache.load(tmp_path / "other")


def test_processors_are_restored_after_a_run_that_raises(tiny_pipe, monkeypatch):
    from anelab.recording import Recorder

    before = dict(tiny_pipe.unet.attn_processors)

    def explode(self, step, timestep):
        raise RuntimeError("boom")

    monkeypatch.setattr(Recorder, "end_step", explode)
    with pytest.raises(RuntimeError, match="boom"):
        anelab.generate(tiny_pipe, PROMPT, TOKENS, record=Record(resolutions=16), **FAST)
    assert dict(tiny_pipe.unet.attn_processors) == before


@pytest.mark.parametrize(
    "record, tokens, message",
    [
        (
            Record(resolutions=(64,)),
            TOKENS,
            "cannot record resolution\\(s\\) \\[64\\] at 128x128: this model has cross-attention at \\[16, 8, 4, 2\\]",
        ),
        (Record(steps=[3, 11]), TOKENS, "Record.steps \\[11\\] are outside the schedule: loop indices are 0..10"),
        (Record(tokens=["bird"]), TOKENS, "'bird' is not a token of 'a cat and a dog'"),
        (Record(), [], 'tokens="subjects"\\) needs subject tokens'),
        (Record(max_gb=1e-5), TOKENS, "recording would hold 0.0 GiB .* over the Record.max_gb budget .* maps=False"),
        ("all", TOKENS, "record must be an anelab.Record"),
    ],
)
def test_bad_recording_requests_fail_before_any_denoising(tiny_pipe, record, tokens, message):
    calls = []
    handle = tiny_pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(AnelabError, match=message):
            anelab.generate(tiny_pipe, PROMPT, tokens, record=record, **FAST)
    finally:
        handle.remove()
    assert calls == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(resolutions=()), "Record.resolutions must be None \\(all\\) or positive ints"),
        (dict(steps=[-1]), "Record.steps must be None"),
        (dict(tokens="nouns"), "Record.tokens must be one of"),
        (dict(heads=True, maps=False), "Record.heads must be True or False, and True needs maps=True"),
        (dict(heads=1), "Record.heads must be True or False"),
        (dict(dtype=torch.int8), "Record.dtype must be a floating"),
        (dict(max_gb=0), "Record.max_gb must be a positive"),
    ],
)
def test_record_validates_its_fields(kwargs, message):
    with pytest.raises(AnelabError, match=message):
        Record(**kwargs)


def test_only_the_recorded_resolutions_materialise_probabilities(tiny_pipe, monkeypatch):
    import anelab.hooks as hooks

    seen = []
    original = hooks.attention_probs
    monkeypatch.setattr(
        hooks,
        "attention_probs",
        lambda attn, h, *a, **k: seen.append((h.shape[0], h.shape[1])) or original(attn, h, *a, **k),
    )
    anelab.generate(tiny_pipe, PROMPT, TOKENS, seeds=[0, 1], record=Record(resolutions=(8,), steps=[0, 5]), **FAST)
    layers = [x for x in cross_attention_layers(tiny_pipe.unet, 16, 16) if x.res == 8]
    assert sorted(seen) == sorted([(2, 64)] * len(layers) * 2)  # conditional rows only, 8x8 layers, two steps


@pytest.fixture(scope="module")
def per_head(tiny_pipe):
    """The same run recorded twice in fp32: head means, and every head."""
    kwargs = dict(seeds=[0, 1], config=GuidanceConfig(attention_res=8, thresholds={0: 0.05, 3: 0.5}), **FAST)
    record = dict(resolutions=(16, 8), steps=[0, 3], tokens="prompt", dtype=torch.float32)
    means = anelab.generate(tiny_pipe, PROMPT, TOKENS, record=Record(**record), **kwargs)
    heads = anelab.generate(tiny_pipe, PROMPT, TOKENS, record=Record(heads=True, **record), **kwargs)
    assert torch.equal(means.latents, heads.latents)
    return means.attention, heads.attention


def test_per_head_maps_average_to_the_head_mean(per_head):
    means, heads = per_head
    assert heads.per_head and not means.per_head and list(heads.keys()) == list(means.keys())
    assert (
        heads.meta["record"]["heads"] is True and "heads" not in means.meta["record"]
    )  # head-mean specs hash as before
    for step, name in means.keys():
        kept = heads[step, name]
        assert kept.shape == (2, heads.heads[name], *means[step, name].shape[1:])  # [n_seeds, heads, h, w, K]
        torch.testing.assert_close(kept.mean(1), means[step, name], rtol=0, atol=1e-6)
    layer = heads.layers_at(8)[0].name
    for k in range(heads.heads[layer]):
        assert torch.equal(heads.maps(token="dog", step=3, layer=layer, seed=1, head=k), heads[3, layer][1, k, ..., 4])
    for where in (dict(layer=layer), dict(res=16), dict(res=8)):
        torch.testing.assert_close(
            heads.maps(token="cat", step=3, seed=0, **where),
            means.maps(token="cat", step=3, seed=0, **where),
            rtol=0,
            atol=1e-6,
        )
    pd.testing.assert_frame_equal(heads.to_frame(), means.to_frame())  # statistics do not depend on what is kept


def test_per_head_maps_round_trip_through_save_and_load(per_head, tmp_path):
    _, heads = per_head
    again = AttentionCache.load(heads.save(tmp_path / "heads"))
    assert again.per_head and list(again.keys()) == list(heads.keys())
    assert all(torch.equal(again[key], heads[key]) and again[key].dtype == heads[key].dtype for key in heads.keys())
    assert again.heads == heads.heads and again.meta == json.loads(
        json.dumps(heads.meta)
    )  # JSON: threshold keys come back as strings


def test_head_questions_with_wrong_answers_get_clear_errors(per_head):
    means, heads = per_head
    layer = heads.layers_at(8)[0].name
    with pytest.raises(AnelabError, match="kept head means only; record with anelab.Record\\(heads=True\\)"):
        means.maps(token="cat", step=0, layer=layer, seed=0, head=0)
    with pytest.raises(AnelabError, match="layer 'down 1.0' has heads 0..1, got head=2"):
        heads.maps(token="cat", step=0, layer=layer, seed=0, head=2)
    with pytest.raises(AnelabError, match="head=0 needs one layer"):
        heads.maps(token="cat", step=0, res=8, seed=0, head=0)


def test_memory_estimate_counts_every_head(tiny_pipe):
    record = dict(resolutions=(16, 8), steps=[0, 3], tokens="prompt")
    means = anelab.generate(tiny_pipe, PROMPT, TOKENS, seeds=[0], record=Record(**record), **FAST).attention
    heads = anelab.generate(
        tiny_pipe,
        PROMPT,
        TOKENS,
        seeds=[0],
        record=Record(heads=True, max_gb=means.nbytes * 2 / 2**30, **record),
        **FAST,
    ).attention
    assert (
        heads.nbytes == 2 * means.nbytes
    )  # two heads per layer in the tiny model; the estimate was exactly at the budget
    with pytest.raises(
        AnelabError, match="MiB, every head\\), over the Record.max_gb budget .* keep head means \\(heads=False\\)"
    ):
        anelab.generate(
            tiny_pipe,
            PROMPT,
            TOKENS,
            seeds=[0],
            record=Record(heads=True, max_gb=(heads.nbytes - 1) / 2**30, **record),
            **FAST,
        )
    anelab.generate(
        tiny_pipe, PROMPT, TOKENS, seeds=[0], record=Record(max_gb=(heads.nbytes - 1) / 2**30, **record), **FAST
    )  # head means fit


def test_layers_have_short_names_and_tokens_position_labels(recorded_512):
    cache = recorded_512.attention
    names = cache.layer_names
    assert list(names) == [
        "down 0.0",
        "down 1.0",
        "down 2.0",
        "mid",
        "up 1.0",
        "up 1.1",
        "up 2.0",
        "up 2.1",
        "up 3.0",
        "up 3.1",
    ]
    assert names["up 1.0"] == "up_blocks.1.attentions.0.transformer_blocks.0.attn2" and list(names.values()) == [
        x.name for x in cache.layers
    ]
    assert torch.equal(
        cache.maps(token="cat", step=2, layer="up 1.0", seed=0),
        cache.maps(token="cat", step=2, layer=names["up 1.0"], seed=0),
    )
    assert (
        short_layer_name("up_blocks.0.attentions.2.transformer_blocks.1.attn2") == "up 0.2 t1"
        and short_layer_name("custom") == "custom"
    )
    with pytest.raises(
        AnelabError,
        match="layer 'up 9.0' was not recorded; recorded layers are down 0.0, down 1.0, .*, up 3.1 \\(short names or module paths\\)",
    ):
        cache.maps(token="cat", step=2, layer="up 9.0", seed=0)
    assert [cache.token_label(i) for i in cache.tokens] == ["a (1)", "cat", "and", "a (4)", "dog", "<eot>"]
    assert cache.token_index("a (4)") == 4 and cache.token_index("A (1)") == 1
    with pytest.raises(AnelabError, match="ambiguous\\); recorded tokens are 1:a 2:cat 3:and 4:a"):
        cache.token_index("a")


def test_vmax_is_the_largest_map_over_steps_and_tokens(recorded_512):
    cache = recorded_512.attention
    per_step = {
        (t, s): float(cache.maps(token=t, step=s, res=32, seed=1).max()) for t in cache.tokens for s in cache.steps
    }
    assert cache.vmax(tokens=["dog"], res=32, seed=1) == pytest.approx(max(per_step[5, s] for s in cache.steps))
    assert cache.vmax(res=32, seed=1) == pytest.approx(max(per_step.values()))
    assert cache.vmax(res=32, seed=1, steps=[2], tokens=[2, 5]) == pytest.approx(max(per_step[2, 2], per_step[5, 2]))
    assert cache.default_res == 16  # plain SD: the A&E default resolution
