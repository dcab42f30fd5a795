import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image

from anelab.cli import _expand_multi_value, main


def run(*args):
    return subprocess.run([sys.executable, "-m", "anelab", *args], capture_output=True, text=True, timeout=300)


def test_multi_value_options_expand():
    assert _expand_multi_value(["generate", "--tokens", "cat", "dog", "--seeds", "0", "1", "--out", "x"]) == [
        "generate",
        "--tokens",
        "cat",
        "--tokens",
        "dog",
        "--seeds",
        "0",
        "--seeds",
        "1",
        "--out",
        "x",
    ]


def test_generate_writes_images_and_trace(tmp_path):
    out = tmp_path / "out"
    result = run(
        "generate",
        "--model",
        "tiny",
        "--prompt",
        "a cat and a dog",
        "--tokens",
        "cat",
        "dog",
        "--seeds",
        "0",
        "1",
        "--steps",
        "12",
        "--attention-res",
        "4",
        "--thresholds",
        "0:0.3,5:0.6",
        "--height",
        "128",
        "--width",
        "128",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    images = sorted((out / "a cat and a dog").iterdir())
    assert [p.name for p in images] == ["0.png", "1.png"] and Image.open(images[0]).size == (128, 128)
    trace = pd.read_parquet(out / "trace.parquet")
    assert set(trace.seed) == {0, 1} and set(trace.token) == {"cat", "dog"} and trace.threshold.dropna().tolist()
    assert "wrote 2 image(s)" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tokens", "cow"], "error: 'cow' is not a token of 'a cat and a dog'"),
        (
            ["--tokens", "cat", "--attention-res", "64", "--height", "128", "--width", "128"],
            "error: attention_res 64 does not exist at 128x128",
        ),
        (
            ["--tokens", "cat", "--steps", "5", "--thresholds", "0:0.05,10:0.5,20:0.8"],
            "error: threshold steps [10, 20] are beyond the schedule",
        ),
        (["--tokens", "cat", "--thresholds", "0:2"], "error: thresholds must lie in [0, 1]"),
        (["--tokens", "cat", "--seeds", "1", "1"], "error: seeds must be distinct"),
        (["--tokens", "cat", "--dtype", "fp8"], "error: dtype must be one of"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as done:
        main(["generate", "--prompt", "a cat and a dog", "--out", str(out), *args])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not out.exists()


def test_out_path_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(SystemExit) as done:
        main(["generate", "--prompt", "a cat", "--tokens", "cat", "--out", str(target)])
    assert done.value.code == 2 and "is a file" in capsys.readouterr().err
    assert target.read_text() == "x"
