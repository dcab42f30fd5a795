"""Real runs: components land on the device asked for, bad devices are refused, seeds can be drawn as the
official code draws them, Hub options reach from_pretrained and Hub failures are told apart."""

import subprocess
import sys

import pytest
import torch

import anelab
from anelab import AnelabError, GuidanceConfig
from anelab.cli import main
from anelab.loading import explain_load_failure, load_pipeline, resolve_device

CUDA = torch.cuda.is_available()
RUN = dict(num_inference_steps=3, height=128, width=128, output_type="latent", progress=False)


def _devices(module: torch.nn.Module) -> set[str]:
    return {t.device.type for t in (*module.parameters(), *module.buffers())}


def test_every_component_moves_to_the_device_asked_for():
    pipe = load_pipeline("tiny", device="meta")
    modules = {name: m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert set(modules) >= {"unet", "vae", "text_encoder"}
    assert {name: _devices(m) for name, m in modules.items()} == {name: {"meta"} for name in modules}


class _Seen(Exception):
    pass


@pytest.mark.parametrize(
    "config", [None, GuidanceConfig(attention_res=8, thresholds={}, max_iter_to_alter=2)], ids=["sd", "ae"]
)
def test_a_run_feeds_the_unet_on_that_device(config):
    """The noise, the text embeddings and the timestep reach the UNet on the pipeline's device (meta: shapes only)."""
    pipe = load_pipeline("tiny", device="meta")
    seen = []

    def look(module, args, kwargs):
        seen.extend(x.device.type for x in (*args, *kwargs.values()) if torch.is_tensor(x))
        raise _Seen

    handle = pipe.unet.register_forward_pre_hook(look, with_kwargs=True)
    try:
        with pytest.raises(_Seen):
            anelab.generate(pipe, "a cat and a dog", ["cat", "dog"], seeds=[0, 1], config=config, **RUN)
    finally:
        handle.remove()
    assert len(seen) >= 3 and set(seen) == {"meta"}


def test_scorers_move_to_the_device_asked_for():
    from anelab.detection import load_detector
    from anelab.metrics import load_blip, load_clip

    for scorer in (
        load_clip("tiny", device="meta"),
        load_blip("tiny", device="meta"),
        load_detector("tiny", device="meta"),
    ):
        assert _devices(scorer.model) == {"meta"}, scorer.name


@pytest.mark.parametrize(
    "device, message", [("nonsense", "unknown device 'nonsense'"), ("cuda:99", "cuda:99"), ("tpu", "unknown device")]
)
def test_unknown_or_unavailable_devices_are_refused(device, message):
    if device == "cuda:99" and not CUDA:
        message = "torch sees no GPU"
    with pytest.raises(AnelabError, match=message):
        resolve_device(device)
    with pytest.raises(AnelabError, match=message):
        load_pipeline("tiny", device=device)


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--prompt", "a cat", "--tokens", "cat", "--out", "OUT", "--device", "cuda"],
        ["sweep", "reproduction", "--out", "OUT", "--device", "cuda"],
        ["score", "OUT", "--clip", "tiny", "--device", "cuda"],
        ["report", "--only", "00", "--out", "OUT", "--device", "cuda"],
        ["bench", "--device", "cuda", "--out", "OUT"],
        ["generate", "--prompt", "a cat", "--tokens", "cat", "--out", "OUT", "--generator-device", "cuda"],
    ],
)
def test_every_command_refuses_cuda_without_a_gpu_in_one_line(tmp_path, capsys, command):
    (tmp_path / "OUT").mkdir()
    with pytest.raises(SystemExit) as done:
        main([str(tmp_path / "OUT") if a == "OUT" else a for a in command])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1 and "torch sees no GPU" in err, err
    assert list((tmp_path / "OUT").iterdir()) == []


def test_generator_device_cuda_without_a_gpu_is_refused(tiny_pipe):
    if CUDA:
        pytest.skip("this machine has a GPU")
    with pytest.raises(AnelabError, match="generator_device='cuda'.*torch sees no GPU"):
        anelab.generate(tiny_pipe, "a cat", ["cat"], config=None, generator_device="cuda", **RUN)
    with pytest.raises(AnelabError, match="generator_device must be one of"):
        anelab.generate(tiny_pipe, "a cat", ["cat"], config=None, generator_device="gpu", **RUN)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_generator_draws_the_official_noise_and_batches_equal_single_runs():
    from diffusers.utils.torch_utils import randn_tensor

    pipe = load_pipeline("tiny", device="cuda")
    one = dict(RUN, num_inference_steps=1)
    batch = anelab.generate(pipe, "a cat", seeds=[21, 42], config=None, generator_device="cuda", **one)
    for k, seed in enumerate([21, 42]):
        single = anelab.generate(pipe, "a cat", seeds=[seed], config=None, generator_device="cuda", **one)
        torch.testing.assert_close(batch.latents[k : k + 1], single.latents)
    cpu = anelab.generate(pipe, "a cat", seeds=[21], config=None, **one)
    assert not torch.allclose(cpu.latents, batch.latents[:1])  # another generator, other noise
    noise = randn_tensor((1, 4, 16, 16), generator=torch.Generator("cuda").manual_seed(21), device=torch.device("cuda"))
    assert noise.device.type == "cuda"


def test_hub_options_reach_from_pretrained(monkeypatch):
    from diffusers import StableDiffusionPipeline

    seen = {}

    def fake(path, **kwargs):
        seen.update(kwargs, path=path)
        raise OSError("stop here")

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", fake)
    with pytest.raises(AnelabError):
        load_pipeline(
            "someone/model",
            device="cpu",
            dtype="fp16",
            revision="v1",
            variant="fp16",
            cache_dir="/tmp/c",
            token="t",
            local_files_only=True,
        )
    assert seen["path"] == "someone/model" and seen["torch_dtype"] == torch.float16
    assert {k: seen[k] for k in ("revision", "variant", "cache_dir", "token", "local_files_only")} == dict(
        revision="v1", variant="fp16", cache_dir="/tmp/c", token="t", local_files_only=True
    )


def _hub_error(kind):
    error = kind.__new__(kind)  # the constructors want an HTTP response; the type is what is classified
    Exception.__init__(error, "hub says no")
    return error


@pytest.mark.parametrize(
    "kind, message",
    [
        ("GatedRepoError", "is gated on the Hugging Face Hub: accept its licence"),
        ("RepositoryNotFoundError", "was not found on the Hugging Face Hub"),
        ("RevisionNotFoundError", "has no such revision"),
        ("LocalEntryNotFoundError", "the Hub cannot be reached"),
    ],
)
def test_hub_failures_are_classified_by_type_not_text(kind, message):
    from huggingface_hub import errors

    cause = _hub_error(getattr(errors, kind))
    try:
        try:
            raise cause
        except Exception as inner:
            raise OSError("diffusers wraps it with some text") from inner
    except OSError as outer:
        said = explain_load_failure("diffusers pipeline", "someone/model", False, outer)
    assert message in said and "\n" not in said


def test_hf_hub_offline_on_is_recognised_as_offline():
    code = (
        "from anelab.loading import explain_load_failure; "
        "print(explain_load_failure('diffusers pipeline', 'a/b', False, ValueError('boom')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"HF_HUB_OFFLINE": "on", "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "cannot be reached (offline or no network)" in out


def test_version_and_help_do_not_import_torch():
    from anelab import __version__

    out = subprocess.run(
        [sys.executable, "-m", "anelab", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"anelab {__version__}" and __version__ != "0+unknown"
    code = "import sys; from anelab.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'pandas', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_the_fast_path_is_off_on_the_cpu_and_refused_when_asked_for(tiny_pipe):
    from anelab.pipeline import plan_run

    assert not plan_run(tiny_pipe, "a cat", tokens=["cat"]).fast  # default: CUDA only
    with pytest.raises(AnelabError, match="fast=True replays CUDA graphs and needs the pipeline on a CUDA GPU"):
        anelab.generate(tiny_pipe, "a cat", ["cat"], config=None, fast=True, **RUN)


def test_channels_last_weights_give_the_same_images():
    """The fast path's layout change alters no value: the same run from channels-last weights agrees to float noise."""
    from anelab import fast

    plain = load_pipeline("tiny", dtype=torch.float64)
    packed = load_pipeline("tiny", dtype=torch.float64)
    fast.channels_last(packed.unet, packed.vae)
    conv = next(m for m in packed.unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    config = GuidanceConfig(attention_res=8, thresholds={0: 0.05}, max_iter_to_alter=2)
    a, b = (
        anelab.generate(p, "a cat and a dog", ["cat", "dog"], seeds=[0], config=config, **RUN).latents
        for p in (plain, packed)
    )
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
