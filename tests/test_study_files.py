"""Study files and overrides as a hostile user writes them: alias bombs, absurd sizes, keys and names given twice,
overrides that the file would refuse, a file that is not UTF-8, a calibration without a source."""

import re
import time

import pytest

from anelab import AnelabError
from anelab.cli import main
from anelab.config import parse_thresholds
from anelab.runs import load_study

STUDY = """\
name: s
prompts:
  - {prompt: a cat and a dog, tokens: [cat, dog]}
seeds: 2
steps: 5
size: 128
variants:
  sd: null
  ae: {attention_res: 8}
"""


def _file(tmp_path, text, name="s.yaml"):
    path = tmp_path / name
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    return path


def test_nested_aliases_are_refused_in_a_moment_without_expanding(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + k)}: &{chr(98 + k)} [*{chr(97 + k)}, *{chr(97 + k)}, *{chr(97 + k)}, *{chr(97 + k)}, *{chr(97 + k)}, *{chr(97 + k)}, *{chr(97 + k)}, *{chr(97 + k)}, *{chr(97 + k)}]\n"
        for k in range(8)
    )
    start = time.perf_counter()
    with pytest.raises(AnelabError, match="expands to over 200,000 YAML nodes"):
        load_study(_file(tmp_path, STUDY + bomb))
    assert time.perf_counter() - start < 2 and len(bomb) < 1500


def test_absurd_sizes_are_refused_with_the_size_and_a_way_to_go_ahead(tmp_path):
    with pytest.raises(AnelabError, match="1000000000000 seeds is more than any study can run"):
        load_study(_file(tmp_path, STUDY.replace("seeds: 2", "seeds: 1000000000000")))
    big = _file(tmp_path, STUDY.replace("seeds: 2", "seeds: 1500000"))
    with pytest.raises(
        AnelabError, match="2 variants x 1 prompts x 1,500,000 seeds = 3,000,000 images, over .*--allow-large"
    ):
        load_study(big)
    assert len(load_study(big, allow_large=True).seeds) == 1_500_000


def test_anything_given_twice_is_refused_naming_both_places(tmp_path):
    with pytest.raises(AnelabError, match="key 'ae' is given twice in one mapping \\(lines 9 and 10\\)"):
        load_study(_file(tmp_path, STUDY + "  ae: {attention_res: 4}\n"))
    with pytest.raises(AnelabError, match="key '1' is given twice in one mapping \\(lines 10 and 11\\)"):
        load_study(_file(tmp_path, STUDY + "  1: {}\n  '1': {attention_res: 4}\n"))
    with pytest.raises(AnelabError, match="key 'seeds' is given twice"):
        load_study(_file(tmp_path, STUDY + "seeds: 3\n"))
    with pytest.raises(AnelabError, match="names variant '1' twice"):
        load_study(
            {**load_study(_file(tmp_path, STUDY)).spec(), "variants": {1: None, "1": {}}}
            | {"prompts": [{"prompt": "a cat", "tokens": ["cat"]}]}
        )
    with pytest.raises(AnelabError, match="thresholds give step 0 twice \\(0.5 and 0.9\\)"):
        parse_thresholds("0:0.5,0:0.9")


def test_cli_refuses_a_layout_given_twice_and_overrides_the_file_would_refuse(tmp_path, capsys):
    for args, message in (
        (["generate", "--prompt", "a cat and a dog", "--tokens", "cat", "--layout", "cat=0.2,0.5", "--layout", "cat=0.8,0.5",
          "--out", str(tmp_path / "o")], "--layout gives 'cat' twice"),
        (["sweep", str(_file(tmp_path, STUDY)), "--size", "100", "--out", str(tmp_path / "v")],
         "the override size=100 must be a multiple of 8"),
        (["sweep", str(_file(tmp_path, b"name: s\nprompts: \xff\xfe\n", "latin.yaml")), "--out", str(tmp_path / "v")],
         "not UTF-8 text \\(byte 17\\)"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as done:
            main(args)
        err = capsys.readouterr().err
        assert done.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert re.search(message, err), err
    assert not (tmp_path / "v").exists() and not (tmp_path / "o").exists()  # a refused command writes nothing


def test_a_calibration_without_a_source_is_one_line(tmp_path):
    text = STUDY + "calibrate: {from: , variants: [ae]}\n"
    with pytest.raises(AnelabError, match="calibrate.from \\(line 10\\): must name the source study"):
        load_study(_file(tmp_path, text))
