"""Hostile and edge inputs end in a one-line refusal (exit 2, nothing written) or a complete, correct result."""

import json
import os
import re
import stat

import pandas as pd
import pytest

import anelab.loading
from anelab import AnelabError
from anelab.cli import main
from anelab.names import MAX_LENGTH, prompt_folder

GENERATE = [
    "generate",
    "--tokens",
    "cat",
    "--steps",
    "3",
    "--height",
    "64",
    "--width",
    "64",
    "--attention-res",
    "2",
    "--thresholds",
    "0:0.1",
    "--max-iter-to-alter",
    "1",
]


def _generate(out, prompt="a cat and a dog", *extra):
    with pytest.raises(SystemExit) as done:
        main([*GENERATE, "--prompt", prompt, "--out", str(out), *extra])
    return done.value.code


def _refused(capsys, args, message, out=None):
    with pytest.raises(SystemExit) as done:
        main(args)
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1 and message in err, err
    if out is not None:
        assert not out.exists() or not any(out.iterdir())


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is built: these inputs must be refused before that."""
    monkeypatch.setattr(
        anelab.loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was built before the input was checked")
    )


def test_prompt_folders_are_safe_bounded_and_distinct():
    assert prompt_folder("a cat and a dog") == "a cat and a dog"  # the A&E layout: the folder is the prompt
    hostile = [
        "a cat and a dog/../../../escaped",
        "..",
        ".",
        "a/b",
        "a\\b",
        "A cat",
        "a cat.",
        " a cat",
        "a  cat",
        "a" * 400,
        "a\x00b",
        "猫",
    ]
    names = [prompt_folder(p) for p in hostile]
    for name in names:
        assert (
            "/" not in name
            and "\\" not in name
            and name not in (".", "..")
            and not name.startswith(".")
            and len(name) <= MAX_LENGTH
        )
        assert "\x00" not in name and name.isprintable()
    assert len(set(names)) == len(hostile)
    assert prompt_folder("a cat") != prompt_folder("A cat")  # case-insensitive disks must not merge them


def test_a_prompt_with_separators_stays_inside_out_and_is_recoverable(tmp_path):
    from anelab.metrics import find_images

    out, prompt = tmp_path / "o", "a cat and a dog/../../../escaped"
    assert _generate(out, prompt) == 0
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    assert folder.name == prompt_folder(prompt) and json.loads((out / "prompts.json").read_text()) == {
        folder.name: prompt
    }
    assert set(find_images(out).prompt) == {prompt}  # the folder → prompt mapping survives in the output alone


def test_a_long_prompt_generates_a_complete_result(tmp_path):
    scenery = " ".join(
        f"next to a {c} {o}"
        for c, o in zip(
            ["orange", "yellow", "purple", "brown", "white", "black", "green"],
            ["suitcase", "backpack", "balloon", "elephant", "bench", "clock", "turtle"],
        )
    )
    prompt = f"a cat sitting in a large forest {scenery} under the sky"  # over 200 characters, within 77 tokens
    assert len(prompt) > 200 and _generate(tmp_path / "o", prompt) == 0
    (image,) = (tmp_path / "o").glob("*/0.png")
    assert len(image.parent.name) <= MAX_LENGTH and pd.read_parquet(
        tmp_path / "o" / "trace.parquet"
    ).prompt.unique().tolist() == [prompt]


def test_a_second_run_keeps_the_first_runs_trace(tmp_path):
    out = tmp_path / "o"
    assert _generate(out, "a cat and a dog") == 0 and _generate(out, "a cat and a bird", "--seeds", "3", "4") == 0
    trace = pd.read_parquet(out / "trace.parquet")
    assert trace.groupby("run").prompt.first().sort_values().tolist() == ["a cat and a bird", "a cat and a dog"]
    assert set(trace.query("prompt == 'a cat and a bird'").seed) == {3, 4}
    config = json.loads(trace.config.iloc[0])
    assert config["thresholds"] == {"0": 0.1} and config["attention_res"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
        (["--guidance-scale", "inf"], "--guidance-scale must be a finite number"),
        (["--scale-factor", "nan"], "--scale-factor must be a finite number"),
        (["--seeds", str(2**64)], "0 <= seed < 2**64"),
        (["--layout", "cat=nan,0.5"], "layout point for 'cat'"),
        (["--tokens", "cow"], "'cow' is not a token of"),
        (["--suppress", "cow"], "'cow' is not a token of"),
        (["--steps", "10", "--thresholds", "0:0.05,10:0.5,20:0.8"], "threshold steps [20] are beyond the schedule"),
        (["--device", "nonsense"], "unknown device 'nonsense'"),
    ],
)
def test_bad_numbers_seeds_and_tokens_are_refused_before_the_model_is_built(tmp_path, capsys, no_model, args, message):
    out = tmp_path / "o"
    _refused(
        capsys, ["generate", "--prompt", "a cat and a dog", "--tokens", "cat", "--out", str(out), *args], message, out
    )
    assert not out.exists()


def test_default_thresholds_follow_the_step_count(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(
            [
                "generate",
                "--prompt",
                "a cat and a dog",
                "--tokens",
                "cat",
                "--steps",
                "10",
                "--height",
                "64",
                "--width",
                "64",
                "--attention-res",
                "2",
                "--out",
                str(tmp_path / "o"),
            ]
        )
    captured = capsys.readouterr()
    assert (
        done.value.code == 0 and "default thresholds and max_iter_to_alter rescaled from 50 to 10 steps" in captured.err
    )
    trace = pd.read_parquet(tmp_path / "o" / "trace.parquet")
    assert sorted(trace.threshold.dropna().unique()) == [0.05, 0.5, 0.8] and sorted(
        trace.dropna(subset="threshold").step.unique()
    ) == [0, 2, 4]


def test_an_output_that_cannot_be_written_is_refused_before_any_model_work(tmp_path, capsys, no_model, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _refused(
        capsys, ["generate", "--prompt", "a cat", "--tokens", "cat", "--out", str(blocker / "sub")], "cannot be created"
    )
    import anelab.io

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(anelab.io.tempfile, "mkstemp", denied)  # a read-only place (root ignores chmod, so simulate it)
    for args in (
        ["generate", "--prompt", "a cat", "--tokens", "cat"],
        ["sweep", "reproduction"],
        ["report", "--only", "00"],
    ):
        _refused(capsys, [*args, "--out", str(tmp_path / "ro")], "cannot be written: Permission denied")
    assert not (tmp_path / "ro").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path, capsys, no_model):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _refused(
            capsys, ["generate", "--prompt", "a cat", "--tokens", "cat", "--out", str(locked)], "cannot be written"
        )
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_output_files_follow_the_umask(tmp_path, mask):
    import anelab.io

    old = os.umask(mask)
    anelab.io.umask.cache_clear()
    try:
        assert _generate(tmp_path / "o") == 0
    finally:
        os.umask(old)
        anelab.io.umask.cache_clear()
    files = [p for p in (tmp_path / "o").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert len(files) >= 3 and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o666 & ~mask}


def test_damaged_files_are_one_line_errors(tmp_path, capsys, tiny_pipe):
    from anelab.cache import AttentionCache

    folder = tmp_path / "scored"
    assert _generate(folder) == 0
    (folder / "metrics.parquet").write_bytes(b"PAR1 not really")
    _refused(capsys, ["score", str(folder), "--clip", "tiny", "--blip", "none"], "metrics.parquet is damaged")
    out = anelab.generate(
        tiny_pipe,
        "a cat and a dog",
        ["cat"],
        config=None,
        num_inference_steps=2,
        height=64,
        width=64,
        record=anelab.Record(resolutions=(4,)),
        progress=False,
    )
    saved = out.attention.save(tmp_path / "cache")
    maps = saved / "maps.safetensors"
    maps.write_bytes(maps.read_bytes()[: maps.stat().st_size // 2])
    with pytest.raises(AnelabError, match="damaged attention cache"):
        AttentionCache.load(saved)


def test_an_api_schedule_that_does_not_fit_says_how_to_rescale(tiny_pipe):
    with pytest.raises(AnelabError, match=r"config.rescaled\(50, n\)"):
        anelab.generate(
            tiny_pipe, "a cat", ["cat"], config=anelab.GuidanceConfig(), num_inference_steps=10, progress=False
        )


def test_values_that_would_mean_nothing_are_one_line_errors(tiny_pipe):
    import math

    import anelab
    from anelab import AnelabError, GuidanceConfig, Record
    from anelab.loading import load_pipeline

    run = dict(num_inference_steps=3, height=128, width=128, output_type="latent", progress=False)
    with pytest.raises(
        AnelabError, match="num_inference_steps 1001 is more than the scheduler's 1000 training timesteps"
    ):
        anelab.generate(tiny_pipe, "a cat and a dog", **(run | {"num_inference_steps": 1001}))
    with pytest.raises(AnelabError, match="guidance_scale must be a finite number >= 0"):
        anelab.generate(tiny_pipe, "a cat and a dog", guidance_scale=-2.0, **run)
    config = GuidanceConfig(attention_res=4, thresholds={}, layout_sigma=1e-6)
    with pytest.raises(
        AnelabError, match="layout_sigma 1e-06 is too narrow for the 4x4 guidance grid: .* at least 0.125"
    ):
        anelab.generate(tiny_pipe, "a cat and a dog", ["cat"], config=config, layout={"cat": (0.2, 0.5)}, **run)
    for budget in (math.nan, math.inf):
        with pytest.raises(AnelabError, match="Record.max_gb must be a positive number"):
            Record(max_gb=budget)
    meta = load_pipeline("tiny", device="meta")
    with pytest.raises(AnelabError, match="a pipeline on the meta device holds shapes only"):
        anelab.generate(meta, "a cat and a dog", **run)


def test_dangling_links_damaged_views_and_a_full_disk_are_one_line_and_leave_nothing(tmp_path, capsys, monkeypatch):
    import pandas as pd

    from anelab.cli import main

    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    generate = ["generate", "--prompt", "a cat and a dog", "--tokens", "cat", "--steps", "3", "--height", "64",
                "--width", "64", "--attention-res", "2", "--thresholds", "", "--max-iter-to-alter", "1"]  # fmt: skip
    for args, message in (
        ([*generate, "--out", str(dangling)], "--out .* is a link to nothing"),
        ([*generate, "--out", str(tmp_path / "o"), "--store", str(dangling)], "--store .* is a link to nothing"),
    ):
        with pytest.raises(SystemExit) as done:
            main(args)
        err = capsys.readouterr().err
        assert done.value.code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err), err
    view = tmp_path / "view"
    view.mkdir()
    (view / "study.json").write_text('{"study": {}}')  # no store
    pd.DataFrame({"variant": ["sd"]}).to_parquet(view / "keys.parquet")  # no key
    with pytest.raises(SystemExit) as done:
        main(["score", str(view), "--clip", "tiny", "--blip", "none"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "holds a damaged view (no store, keys.parquet column 'prompt'" in err

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "o" / "trace.parquet"))

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full)
    with pytest.raises(SystemExit) as done:
        main([*generate, "--out", str(tmp_path / "o"), "--store", str(tmp_path / "store")])
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        done.value.code == 2
        and err[-1].startswith("error: No space left on device")
        and "Traceback" not in " ".join(err)
    )


def test_a_refused_sweep_leaves_no_store_skeleton(tmp_path, tiny_pipe):
    from anelab.runs import Store, load_study, run_sweep

    study = load_study(
        {"name": "bad", "prompts": [{"prompt": "a cat", "tokens": ["dog"]}], "seeds": 1, "steps": 3, "size": 128,
         "variants": {"ae": {"attention_res": 8}}}
    )  # fmt: skip
    with pytest.raises(AnelabError, match="'dog' is not a token of 'a cat'"):
        run_sweep(study, tiny_pipe, tmp_path / "view", model="tiny", store=Store(tmp_path / "store"), progress=False)
    assert not (tmp_path / "store").exists() and not (tmp_path / "view").exists()
