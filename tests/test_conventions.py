"""What users expect of a diffusers-era library: ``callback_on_step_end`` as diffusers' pipelines have it, messages
through the ``anelab`` logger (never print), and the CLI's --quiet / --verbose."""

import logging

import pytest
import torch

import anelab
from anelab import AnelabError, GuidanceConfig
from anelab.cli import main
from anelab.log import bars_off, show

PROMPT = "a cat and a dog"
SMALL = dict(height=128, width=128, num_inference_steps=6, output_type="latent", progress=False)


def _halve_at_step_2(pipe, i, t, kwargs):
    return {"latents": kwargs["latents"] * 0.5} if i == 2 else {}


def test_a_callback_that_halves_the_latents_gives_diffusers_latents_with_the_same_callback(tiny_pipe):
    ref = tiny_pipe(
        PROMPT,
        generator=torch.Generator("cpu").manual_seed(3),
        callback_on_step_end=_halve_at_step_2,
        callback_on_step_end_tensor_inputs=["latents"],
        **{k: v for k, v in SMALL.items() if k != "progress"},
    ).images
    plain = anelab.generate(tiny_pipe, PROMPT, seeds=[3], **SMALL)
    out = anelab.generate(tiny_pipe, PROMPT, seeds=[3], callback_on_step_end=_halve_at_step_2, **SMALL)
    torch.testing.assert_close(out.latents, ref, rtol=1e-5, atol=1e-5)
    assert (out.latents - plain.latents).abs().max() > 1e-2  # the callback did act


def test_the_callback_sees_every_step_and_what_it_asked_for_and_a_pass_through_changes_nothing(tiny_pipe):
    seen = []

    def watch(pipe, i, t, kwargs):
        seen.append((i, int(t), sorted(kwargs), tuple(kwargs["latents"].shape), tuple(kwargs["prompt_embeds"].shape)))
        return kwargs

    config = GuidanceConfig(attention_res=4, max_iter_to_alter=3, thresholds={0: 0.5, 2: 0.8})
    names = ["latents", "prompt_embeds"]
    base = anelab.generate(tiny_pipe, PROMPT, ["cat", "dog"], seeds=[0, 1], config=config, **SMALL)
    out = anelab.generate(
        tiny_pipe,
        PROMPT,
        ["cat", "dog"],
        seeds=[0, 1],
        config=config,
        callback_on_step_end=watch,
        callback_on_step_end_tensor_inputs=names,
        **SMALL,
    )
    assert torch.equal(out.latents, base.latents)
    assert [s[0] for s in seen] == list(range(len(out.timesteps))) and [s[1] for s in seen] == out.timesteps
    assert all(s[2] == names and s[3] == (2, 4, 16, 16) and s[4][0] == 1 for s in seen)


def test_a_callback_may_replace_the_text_embeddings_as_in_diffusers(tiny_pipe):
    def ours(pipe, i, t, kwargs):  # after step 0 the conditional rows see the empty prompt: CFG becomes unconditional
        return {"prompt_embeds": kwargs["negative_prompt_embeds"]} if i == 0 else {}

    def theirs(pipe, i, t, kwargs):  # diffusers hands the CFG batch's [uncond, cond] embeddings as prompt_embeds
        negative = kwargs["negative_prompt_embeds"]
        return {"prompt_embeds": torch.cat([negative, negative])} if i == 0 else {}

    names = ["prompt_embeds", "negative_prompt_embeds"]
    ref = tiny_pipe(
        PROMPT,
        generator=torch.Generator("cpu").manual_seed(0),
        callback_on_step_end=theirs,
        callback_on_step_end_tensor_inputs=names,
        **{k: v for k, v in SMALL.items() if k != "progress"},
    ).images
    out = anelab.generate(
        tiny_pipe, PROMPT, seeds=[0], callback_on_step_end=ours, callback_on_step_end_tensor_inputs=names, **SMALL
    )
    plain = anelab.generate(tiny_pipe, PROMPT, seeds=[0], **SMALL)
    torch.testing.assert_close(out.latents, ref, rtol=1e-5, atol=1e-5)
    assert (out.latents - plain.latents).abs().max() > 1e-2


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(callback_on_step_end="not a function"), "must be callable"),
        (dict(callback_on_step_end=_halve_at_step_2, callback_on_step_end_tensor_inputs=["noise"]), "allowed"),
        (dict(callback_on_step_end=lambda p, i, t, k: {"latents": k["latents"][:, :2]}), "expected a tensor of shape"),
        (dict(callback_on_step_end=lambda p, i, t, k: {"timesteps": k["latents"]}), "it may return"),
        (dict(callback_on_step_end=lambda p, i, t, k: [k["latents"]]), "must return a dict"),
    ],
)
def test_a_bad_callback_is_one_line(tiny_pipe, options, message):
    with pytest.raises(AnelabError, match=message):
        anelab.generate(tiny_pipe, PROMPT, seeds=[0], **(SMALL | options))


def test_a_diffusers_pipeline_callback_brings_its_tensor_inputs(tiny_pipe):
    class Scale:  # duck-types diffusers.callbacks.PipelineCallback
        tensor_inputs = ["latents"]

        def __call__(self, pipe, i, t, kwargs):
            assert list(kwargs) == ["latents"]
            return {"latents": kwargs["latents"] * 0.5} if i == 2 else {}

    out = anelab.generate(tiny_pipe, PROMPT, seeds=[3], callback_on_step_end=Scale(), **SMALL)
    same = anelab.generate(tiny_pipe, PROMPT, seeds=[3], callback_on_step_end=_halve_at_step_2, **SMALL)
    assert torch.equal(out.latents, same.latents)


# -- messages -------------------------------------------------------------------------------------------------
def test_library_notes_go_to_the_anelab_logger_never_to_stdout(tmp_path, capsys, caplog):
    from anelab.runs import run_study

    caplog.set_level(logging.INFO, logger="anelab")
    small = dict(scale="smoke", store=tmp_path / "store", progress=False, prompts=1, seeds=1)
    run_study("resolution", "tiny", tmp_path / "out", steps=4, **small)
    run_study("resolution", "tiny", tmp_path / "out", steps=3, **small)  # the view shows another spec: a note
    assert capsys.readouterr().out == ""
    notes = [r.getMessage() for r in caplog.records if r.name == "anelab"]
    assert any(n.startswith("note:") for n in notes) and any("image" in n for n in notes)


def test_bars_follow_the_logger_level():
    logger = logging.getLogger("anelab")
    level = logger.level
    try:
        logger.setLevel(logging.NOTSET)  # never configured: bars as asked
        assert bars_off(True) is False and bars_off(False) is True
        logger.setLevel(logging.WARNING)
        assert bars_off(True) is True
        logger.setLevel(logging.DEBUG)
        assert bars_off(True) is False
    finally:
        logger.setLevel(level)
    with pytest.raises(ValueError, match="DEBUG, INFO"):
        show("LOUD")


def _generate(tmp_path, *flags):
    args = [*flags, "generate", "--prompt", PROMPT, *"--tokens cat dog --steps 6 --height 128 --width 128".split()]
    with pytest.raises(SystemExit) as done:
        main([*args, "--out", str(tmp_path / "o"), "--store", str(tmp_path / "store")])
    return done.value.code


def test_cli_quiet_keeps_only_the_result_and_verbose_adds_what_was_done(tmp_path, capsys):
    level = logging.getLogger("anelab").level
    try:
        assert _generate(tmp_path, "--quiet") == 0
        quiet = capsys.readouterr()
        assert "wrote 1 image" in quiet.out and "note:" not in quiet.err and "A&E" not in quiet.err  # no bar
        assert _generate(tmp_path / "v", "--verbose") == 0
        verbose = capsys.readouterr()
        assert "6 steps, 128x128 px" in verbose.err and "note: default thresholds" in verbose.err
        assert _generate(tmp_path / "q", "--quiet", "--verbose") == 2
        assert "contradict" in capsys.readouterr().err
    finally:
        show(level or logging.WARNING)
        logging.getLogger("anelab").setLevel(level)
