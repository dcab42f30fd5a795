"""The fast path (anelab.fast) and the low-memory guided backward (anelab.memory).

Without a GPU the fast path runs its CPU stand-in: every graph's function runs on the graph's static
tensors at each call instead of replaying captured kernels. A cached graph keeps the function (and the
Python state) of the run that created it, as a captured graph does, so a cache key that misses a setting
or a run-specific tensor that is not a static input shows up here as a result that differs from eager.
"""

import os
import warnings

import pytest
import torch

import anelab
from anelab import AnelabError, GuidanceConfig, fast, memory
from anelab.cli import main
from anelab.loading import load_pipeline

CUDA = torch.cuda.is_available()
RUN = dict(num_inference_steps=6, height=128, width=128, output_type="latent", progress=False)
PROMPT, TOKENS = "a cat and a dog", ["cat", "dog"]
# refinement at loop index 1 (far below the threshold on the random model: every sample refines to the cap) and
# regular updates at 0..2
REFINING = GuidanceConfig(attention_res=8, thresholds={1: 0.99}, max_iter_to_alter=3, max_refinement_steps=2)


@pytest.fixture
def stand_in(monkeypatch):
    """The fast path on the CPU (its stand-in), on a pipeline of its own (the cache lives on the UNet)."""
    monkeypatch.setattr(fast, "available", lambda device: True)
    return load_pipeline("tiny")


def _same(a, b) -> None:
    decisions = ["triggered", "refinement_iterations", "reached", "updated", "nonfinite"]
    assert a.trace[decisions].equals(b.trace[decisions])
    torch.testing.assert_close(a.latents, b.latents, rtol=1e-6, atol=1e-6)
    numbers = ["max_attention", "loss", "final_max_attention", "final_loss"]
    torch.testing.assert_close(torch.tensor(a.trace[numbers].values), torch.tensor(b.trace[numbers].values))


def _cache(pipe) -> fast.GraphCache:
    return pipe.unet.__dict__["_anelab_graphs"]


def test_the_fast_path_gives_the_eager_results_and_keeps_its_graphs_between_runs(stand_in):
    runs = {
        f: anelab.generate(stand_in, PROMPT, TOKENS, seeds=[0, 1], config=REFINING, fast=f, **RUN)
        for f in (None, False)
    }
    _same(runs[None], runs[False])
    assert runs[None].trace.drop_duplicates(["seed", "step"]).query("step == 1").refinement_iterations.eq(2).all()
    kinds = sorted(key[0] for key in _cache(stand_in).graphs)
    assert kinds == ["CFG forward", "guided step"]  # the refinement's forwards run at the full batch of 2 here
    # another prompt with the same token positions replays the same graphs with its own text as input
    graphs = dict(_cache(stand_in).graphs)
    other = {
        f: anelab.generate(stand_in, "a dog and a cat", ["dog", "cat"], seeds=[3], config=REFINING, fast=f, **RUN)
        for f in (None, False)
    }
    _same(other[None], other[False])
    assert all(key in _cache(stand_in).graphs for key in graphs)
    assert len(_cache(stand_in).graphs) == len(graphs) + 2  # batch 1: one new CFG and one new guided-step graph


@pytest.mark.parametrize("model", ["tiny-sd2", "tiny-xl"])
def test_the_fast_path_on_sd2_and_sdxl(model, monkeypatch):
    """SDXL's pooled text embeddings and size ids are nested UNet inputs: they go through the graphs as static tensors too."""
    monkeypatch.setattr(fast, "available", lambda device: True)
    pipe = load_pipeline(model)
    runs = {f: anelab.generate(pipe, PROMPT, TOKENS, seeds=[0], config=REFINING, fast=f, **RUN) for f in (None, False)}
    _same(runs[None], runs[False])
    assert sorted(key[0] for key in _cache(pipe).graphs) == ["CFG forward", "guided step"]


def test_a_different_guidance_setup_gets_its_own_graph(stand_in):
    anelab.generate(stand_in, PROMPT, TOKENS, seeds=[0], config=REFINING, **RUN)
    before = set(_cache(stand_in).graphs)
    for config in (REFINING.replace(temperature=50.0), REFINING.replace(kernel_size=5, sigma=1.0)):
        runs = {
            f: anelab.generate(stand_in, PROMPT, TOKENS, seeds=[0], config=config, fast=f, **RUN) for f in (None, False)
        }
        _same(runs[None], runs[False])
    steps = [key for key in set(_cache(stand_in).graphs) - before if key[0] == "guided step"]
    assert len(steps) == 2


def test_suppression_layout_and_recording_on_the_fast_path(stand_in):
    config = REFINING.replace(suppress_scale=2.0, layout_scale=0.5)
    common = dict(seeds=[0], suppress=["dog"], layout={"cat": (0.2, 0.5)}, **RUN)
    record = anelab.Record(resolutions=[8], steps=[0, 4])
    runs = {
        f: anelab.generate(stand_in, PROMPT, ["cat"], config=config, fast=f, record=record, **common)
        for f in (None, False)
    }
    _same(runs[None], runs[False])
    a, b = runs[None].attention, runs[False].attention
    assert len(a) == len(b) > 0 and all(torch.equal(a[key], b[key]) for key in a.keys())
    recorded = [key for key in _cache(stand_in).graphs if key[0] == "CFG forward" and key[1]]
    assert len(recorded) == 1  # the recorded steps' forward, with the 8x8 layers' probabilities as outputs
    two_stage = config.replace(layout_update="two_stage")  # two gradients of one forward: runs eagerly
    runs = {f: anelab.generate(stand_in, PROMPT, ["cat"], config=two_stage, fast=f, **common) for f in (None, False)}
    _same(runs[None], runs[False])


def test_a_changed_unet_drops_the_graphs(stand_in):
    from diffusers.models.attention_processor import AttnProcessor

    def changed(unet) -> bool:
        anelab.generate(stand_in, PROMPT, TOKENS, config=None, **RUN)
        assert _cache(stand_in).graphs
        before = fast.fingerprint(unet)
        yield
        assert fast.fingerprint(unet) != before
        fast.graph_cache(unet)
        assert not _cache(stand_in).graphs

    unet = stand_in.unet
    for change in (
        lambda: unet.set_attn_processor(AttnProcessor()),  # other kernels
        lambda: unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4),  # settings read in the forward
        lambda: unet.train(),
        lambda: setattr(torch.backends.cudnn, "benchmark", not torch.backends.cudnn.benchmark),  # kernel choice
        lambda: unet.to(torch.float64).to(torch.float32),  # the same values, stored elsewhere
    ):
        steps = changed(unet)
        next(steps)
        change()
        next(steps, None)
    unet.eval()
    torch.backends.cudnn.benchmark = not torch.backends.cudnn.benchmark


def test_a_failed_capture_warns_once_and_turns_graphs_off_for_that_unet(stand_in, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(fast, "StaticGraph", fail)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: "stream")
    cache = fast.GraphCache()
    with pytest.warns(UserWarning, match="CUDA graph capture of the guided step failed .*this UNet runs eagerly"):
        assert cache.get("guided step", (), fail, {"z": torch.zeros(1)}, capture=True) is None
    assert cache.pool is None and "stream is capturing" in cache.broken  # the pool may be mid-capture: dropped
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: no other capture is tried on this UNet
        assert cache.get("CFG forward", None, fail, {"x": torch.zeros(2)}, capture=True) is None
    with pytest.raises(RuntimeError, match="stream is capturing"):  # the CPU stand-in never hides an error
        cache.get("guided step", (), fail, {"z": torch.zeros(2)}, capture=False)
    # a run whose graphs all failed is the eager run
    monkeypatch.setattr(fast.GraphCache, "get", lambda self, *args: None)
    runs = {
        f: anelab.generate(stand_in, PROMPT, TOKENS, seeds=[0], config=REFINING, fast=f, **RUN) for f in (None, False)
    }
    _same(runs[None], runs[False])


def test_the_graph_cache_keeps_a_few_graphs_of_each_kind():
    cache = fast.GraphCache(size=2)
    for n in range(1, 5):
        cache.get("guided step", None, lambda s: {"y": s["z"] * 2}, {"z": torch.ones(n)}, capture=False)
    assert [key[2][0][1] for key in cache.graphs] == [(3,), (4,)]  # the two most recent batch sizes
    out = cache.get("guided step", None, lambda s: None, {"z": torch.ones(4)}, capture=False)(
        {"z": torch.full((4,), 3.0)}
    )
    assert out["y"].tolist() == [6.0] * 4  # the cached function, on the new input


def test_the_graphed_forward_flattens_and_rebuilds_the_unet_arguments():
    """A graph keeps every input tensor static; SDXL's nested added_cond_kwargs survive the flattening."""
    kwargs = {
        "encoder_hidden_states": torch.zeros(2, 3),
        "added_cond_kwargs": {"text_embeds": torch.ones(2), "time_ids": torch.ones(2, 6)},
    }
    flat = fast.flat(kwargs)
    assert list(flat) == ["encoder_hidden_states", "added_cond_kwargs.text_embeds", "added_cond_kwargs.time_ids"]
    rebuilt = fast.nested({"x": None, "t": None, **flat}, skip=("x", "t"))
    assert (
        rebuilt.keys() == kwargs.keys()
        and rebuilt["added_cond_kwargs"]["time_ids"] is kwargs["added_cond_kwargs"]["time_ids"]
    )


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_captured_graphs_equal_eager_on_cuda():
    pipe = load_pipeline("tiny", device="cuda")
    for config in (None, REFINING):
        runs = {
            f: anelab.generate(pipe, PROMPT, TOKENS, seeds=[0, 1], config=config, fast=f, **RUN) for f in (True, False)
        }
        torch.testing.assert_close(runs[True].latents, runs[False].latents, rtol=1e-5, atol=1e-5)
        if config is not None:
            assert runs[True].trace.refinement_iterations.equals(runs[False].trace.refinement_iterations)
    assert all(graph.graph is not None for graph in _cache(pipe).graphs.values())


# -- low memory ------------------------------------------------------------------------------------------
def test_low_memory_gives_the_same_images_and_holds_a_fraction_for_the_backward(tiny_pipe):
    held, runs = {}, {}
    for low in (False, True):
        with memory.HeldForBackward(exclude=tiny_pipe.unet.parameters()) as h:
            runs[low] = anelab.generate(tiny_pipe, PROMPT, TOKENS, seeds=[0, 1], config=REFINING, low_memory=low, **RUN)
        held[low] = h.peak
        assert h.current == 0  # everything held was released with its graph
    _same(runs[True], runs[False])
    assert held[True] < 0.6 * held[False]  # measured: 0.29x at 8x8 guidance on the tiny UNet
    assert not any(getattr(m, "gradient_checkpointing", False) for m in tiny_pipe.unet.modules())  # restored


def test_low_memory_reads_the_environment_and_refuses_nonsense(monkeypatch):
    monkeypatch.delenv(memory.ENV, raising=False)
    assert memory.requested(None) is False and memory.requested(True) is True
    monkeypatch.setenv(memory.ENV, "yes")
    assert memory.requested(None) is True and memory.requested(False) is False
    monkeypatch.setenv(memory.ENV, "maybe")
    with pytest.raises(AnelabError, match=r"\$ANELAB_LOW_MEMORY must be 1/true/yes/on or 0/false/no/off, got 'maybe'"):
        memory.requested(None)
    with pytest.raises(AnelabError, match="low_memory must be True, False or None"):
        memory.requested("on")


def test_the_cli_flag_turns_low_memory_on(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(memory.ENV, raising=False)
    asked = []
    real = memory.requested
    monkeypatch.setattr(memory, "requested", lambda value: asked.append(real(value)) or asked[-1])
    args = [
        "generate",
        "--prompt",
        PROMPT,
        "--tokens",
        "cat",
        "dog",
        "--steps",
        "3",
        "--height",
        "64",
        "--width",
        "64",
        "--attention-res",
        "8",
    ]
    for seed, flag in ((0, []), (1, ["--low-memory"])):
        with pytest.raises(SystemExit) as done:
            main([*args, "--seeds", str(seed), *flag, "--out", str(tmp_path / str(seed))])
        assert done.value.code == 0, capsys.readouterr().err
        os.environ.pop(memory.ENV, None)  # the flag sets it for the process (monkeypatch would restore it)
    assert asked[0] is False and asked[-1] is True
