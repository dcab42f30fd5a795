"""Metrics: CLIP and BLIP scores against direct computation, guidance statistics, aggregation, `anelab score`."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from anelab import AnelabError
from anelab.analysis import guidance_stats, summarize
from anelab.cli import main
from anelab.metrics import (
    BLIP_PROMPT,
    clip_scores,
    find_images,
    imagenet_templates,
    load_blip,
    load_clip,
    score_folder,
    templated,
    text_text_scores,
)
from anelab.prompts import sub_prompts


@pytest.fixture(scope="module")
def clip():
    return load_clip("tiny", device="cpu")


@pytest.fixture(scope="module")
def blip():
    return load_blip("tiny", device="cpu")


def _images(n, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _direct_text(clip, texts):
    tokens = clip.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = clip.model.get_text_features(**tokens)
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return out / out.norm(dim=-1, keepdim=True)


def _direct_prompt(clip, prompt):
    sentences = [t.format(prompt) for t in imagenet_templates()]
    sentences = [s.replace("a a", "a") for s in sentences]
    sentences = [s.replace("the a", "a") for s in sentences]
    mean = _direct_text(clip, sentences).mean(0)
    return mean / mean.norm()


def _direct_image(clip, image):
    pixels = clip.image_processor(images=[image], return_tensors="pt").pixel_values
    with torch.no_grad():
        out = clip.model.get_image_features(pixel_values=pixels)
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return (out / out.norm(dim=-1, keepdim=True))[0]


def test_templates_and_the_official_plain_replacements():
    assert len(imagenet_templates()) == 80
    sentences = templated("a cat and a dog")
    assert sentences[0] == "a bad photo of a cat and a dog."  # "of a a cat" -> "of a cat"
    assert (
        "a photo of a cat and a dog." in sentences and "a plastic a cat and a dog." in sentences
    )  # double article kept
    assert not any("the a cat" in s for s in sentences)


def test_clip_scores_equal_a_direct_computation(clip):
    images = _images(3)
    prompts = ["a cat and a dog", "a horse with a glasses", "a red car"]
    scores = clip_scores(images, prompts, clip, batch_size=2)
    for image, prompt, row in zip(images, prompts, scores.itertuples()):
        embedding = _direct_image(clip, image)
        assert row.full_prompt == pytest.approx(float(embedding @ _direct_prompt(clip, prompt)), abs=1e-6)
        halves = sub_prompts(prompt)
        if halves is None:
            assert np.isnan(row.first_half) and np.isnan(row.min_object)
            continue
        first, second = (float(embedding @ _direct_prompt(clip, h)) for h in halves)
        assert (row.first_half, row.second_half) == (pytest.approx(first, abs=1e-6), pytest.approx(second, abs=1e-6))
        assert row.min_object == min(row.first_half, row.second_half)


def test_the_split_rule_gives_the_right_halves_for_all_276_prompts(ane_prompts):
    assert len(ane_prompts) == 276
    for prompt, nouns in zip(ane_prompts.prompt, ane_prompts.tokens):
        first, second = sub_prompts(prompt)
        separator = " with " if " with " in prompt else " and "
        assert first + separator + second == prompt
        assert (
            nouns[0] in first.split()
            and nouns[1] in second.split()
            and first.startswith("a ")
            and second.startswith("a ")
        )
    assert sub_prompts("a monkey and a red car") == ("a monkey", "a red car")
    assert sub_prompts("a horse with a glasses") == ("a horse", "a glasses")


def test_blip_captions_offline_and_text_text_equals_a_direct_computation(clip, blip):
    images = _images(2, seed=1)
    frame = text_text_scores(images, "a cat and a dog", clip, blip)
    assert all(isinstance(c, str) and c and not c.startswith(BLIP_PROMPT.strip()) for c in frame.caption)
    inputs = blip.processor(images=images[:1], text=["a picture of"], return_tensors="pt")
    raw = blip.processor.batch_decode(
        blip.model.generate(**inputs, num_beams=3, min_length=10, max_length=30), skip_special_tokens=True
    )[0]
    assert raw == BLIP_PROMPT + frame.caption[0]
    for caption, score in zip(frame.caption, frame.text_text):
        direct = float(_direct_text(clip, [caption])[0] @ _direct_prompt(clip, "a cat and a dog"))
        assert score == pytest.approx(direct, abs=1e-6)


def _trace(rows):
    """Hand-made trace: (seed, step, threshold, triggered, reached, iterations), two tokens each."""
    records = []
    for seed, step, threshold, triggered, reached, iterations in rows:
        for token in ("cat", "dog"):
            records.append(
                dict(
                    seed=seed,
                    step=step,
                    token=token,
                    threshold=threshold,
                    triggered=triggered,
                    reached=reached,
                    refinement_iterations=iterations,
                )
            )
    frame = pd.DataFrame(records)
    frame["reached"] = frame.reached.astype("boolean")
    return frame


def test_guidance_stats_on_a_hand_made_trace():
    trace = _trace(
        [
            (0, 0, 0.05, False, True, 0),
            (0, 5, np.nan, False, pd.NA, 0),
            (0, 10, 0.5, True, True, 3),
            (1, 0, 0.05, True, False, 20),
            (1, 10, 0.5, False, True, 0),
            (2, 0, 0.05, False, True, 0),
            (2, 10, 0.5, True, True, 1),
        ]
    )
    stats = guidance_stats(trace).set_index("step", drop=False)
    overall = stats[stats.step.isna()].iloc[0]
    assert (overall.pairs, overall.triggered) == (6, 3)
    assert overall.guidance_rate == pytest.approx(3 / 6) and overall.success_rate == pytest.approx(2 / 3)
    assert overall.mean_refinement_rounds == pytest.approx(24 / 6)
    step0, step10 = stats.loc[0], stats.loc[10]
    assert (step0.guidance_rate, step0.success_rate, step0.mean_refinement_rounds) == (
        pytest.approx(1 / 3),
        0.0,
        pytest.approx(20 / 3),
    )
    assert (step10.guidance_rate, step10.success_rate, step10.mean_refinement_rounds) == (
        pytest.approx(2 / 3),
        1.0,
        pytest.approx(4 / 3),
    )
    assert 5 not in stats.step.dropna().tolist()  # a step without a threshold is not a pair


def test_guidance_stats_by_category_and_with_nothing_triggered():
    trace = pd.concat(
        [
            _trace([(0, 0, 0.05, False, True, 0)]).assign(prompt="a cat and a dog", category="animal_animal"),
            _trace([(0, 0, 0.05, True, True, 2)]).assign(prompt="a cat with a crown", category="animal_object"),
        ]
    )
    stats = guidance_stats(trace, by=["category"])
    overall = stats[stats.step.isna()].set_index("category")
    assert overall.at["animal_animal", "guidance_rate"] == 0 and np.isnan(overall.at["animal_animal", "success_rate"])
    assert overall.at["animal_object", "mean_refinement_rounds"] == 2
    assert guidance_stats(trace.assign(threshold=np.nan, triggered=False)).pairs.tolist() == [0]
    unthresholded = guidance_stats(trace.assign(threshold=np.nan))  # refined without a threshold (CONFORM)
    assert unthresholded.pairs.tolist() == [1, 1] and unthresholded.success_rate.isna().all()


def test_summarize_gives_mean_std_and_a_t_interval_per_category_and_overall():
    frame = pd.DataFrame({"category": ["a", "a", "a", "b", "b"], "score": [1.0, 2.0, 3.0, 10.0, np.nan]})
    table = summarize(frame, ["score"]).set_index("category")
    assert table.loc["a", "mean"] == 2.0 and table.loc["a", "std"] == 1.0 and table.loc["a", "n"] == 3
    assert table.loc["a", "ci_high"] - 2.0 == pytest.approx(4.302652729911275 / np.sqrt(3))  # t(0.975, 2)
    assert table.loc["b", "n"] == 1 and np.isnan(table.loc["b", "ci_low"])
    assert table.loc["overall", "mean"] == pytest.approx(4.0) and table.loc["overall", "n"] == 4


def _folder(root, prompts_seeds):
    for prompt, seeds in prompts_seeds.items():
        (root / prompt).mkdir(parents=True)
        for seed, image in zip(seeds, _images(len(seeds), seed=len(prompt))):
            image.save(root / prompt / f"{seed}.png")


def test_score_folder_is_resumable_and_reports_what_it_could_not_score(tmp_path, clip, blip):
    _folder(tmp_path, {"a cat and a dog": [0, 1, 2], "a red car": [0]})
    (tmp_path / "a cat and a dog" / "3.png").write_text("not an image")
    table, notices, counts = score_folder(tmp_path, clip, blip, chunk=2, progress=False)
    assert counts == {"scored": 4, "already": 0}
    assert sorted(table.path) == [
        "a cat and a dog/0.png",
        "a cat and a dog/1.png",
        "a cat and a dog/2.png",
        "a red car/0.png",
    ]
    assert any("could not read a cat and a dog/3.png" in n for n in notices)
    assert any("neither ' and ' nor ' with '" in n and "a red car" in n for n in notices)
    assert np.isnan(table.set_index("prompt").at["a red car", "min_object"])
    assert set(table.category.dropna()) == {"animal_animal"} and (table.clip_model == "tiny").all()
    direct = clip_scores([tmp_path / "a cat and a dog" / "1.png"], "a cat and a dog", clip)
    assert table.set_index("path").loc["a cat and a dog/1.png", "full_prompt"] == pytest.approx(
        direct.full_prompt[0], abs=1e-7
    )
    _folder(tmp_path / "more", {"a bird and a bear": [5]})
    calls = []
    original = clip.embed_images
    clip.embed_images = lambda images, *a: calls.append(len(images)) or original(images, *a)
    try:
        again, _, counts = score_folder(tmp_path, clip, blip, progress=False)
    finally:
        del clip.embed_images
    assert (
        calls == [1, 1] and len(again) == 5
    )  # CLIP's scores and its binding margin, of the new image only and counts == {"scored": 1, "already": 4}  # only the new image was scored
    pd.testing.assert_frame_equal(again.iloc[:4], table)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_adding_a_scorer_scores_what_is_missing_and_another_model_is_refused(tmp_path, clip, blip):
    """Scored without BLIP, then with it: the captions are added (not "0 scored"); then the detector adds its columns."""
    _folder(tmp_path, {"a cat and a dog": [0, 1], "a cat at right": [0]})
    first, _, counts = score_folder(tmp_path, clip, None, progress=False)
    assert counts["scored"] == 3 and first.text_text.isna().all() and first.blip_model.isna().all()
    second, _, counts = score_folder(tmp_path, clip, blip, progress=False)
    assert (
        counts == {"scored": 3, "already": 0} and second.text_text.notna().all() and (second.blip_model == "tiny").all()
    )
    pd.testing.assert_series_equal(
        second.full_prompt, first.full_prompt
    )  # CLIP scores kept, not recomputed differently
    third, notices, counts = score_folder(tmp_path, clip, blip, detector="tiny", progress=False)
    assert counts["scored"] == 3 and (third.detector_model == "tiny").all()
    by_prompt = third.set_index("path")
    assert (
        by_prompt.at["a cat and a dog/0.png", "subjects"] == "cat,dog"
        and by_prompt.at["a cat at right/0.png", "subjects"] == "right"
    )
    assert np.isnan(by_prompt.at["a cat at right/0.png", "all_present"]) and any(
        "not detectable" in n and "right" in n for n in notices
    )
    assert set(third.loc[third.subjects == "cat,dog", "present_0"]) <= {0.0, 1.0}
    assert score_folder(tmp_path, clip, blip, detector="tiny", progress=False)[2] == {"scored": 0, "already": 3}
    with pytest.raises(AnelabError, match="scored with blip \\['tiny'\\], not 'other'"):
        score_folder(tmp_path, clip, type(blip)(blip.model, blip.processor, "other"), progress=False)


def test_sweep_layout_gives_variants(tmp_path):
    _folder(tmp_path / "images" / "sd", {"a cat and a dog": [0]})
    _folder(tmp_path / "images" / "res16", {"a cat and a dog": [0, 1]})
    found = find_images(tmp_path)
    assert (
        sorted(found.variant) == ["res16", "res16", "sd"]
        and set(found.prompt) == {"a cat and a dog"}
        and set(found.seed) == {0, 1}
    )


def test_local_clip_and_blip_directories_load_and_score_the_same(tmp_path, clip, blip):
    clip.model.save_pretrained(tmp_path / "clip")
    clip.tokenizer.save_pretrained(tmp_path / "clip")
    clip.image_processor.save_pretrained(tmp_path / "clip")
    blip.model.save_pretrained(tmp_path / "blip")
    blip.processor.save_pretrained(tmp_path / "blip")
    images = _images(1)
    local_clip, local_blip = (
        load_clip(str(tmp_path / "clip"), device="cpu"),
        load_blip(str(tmp_path / "blip"), device="cpu"),
    )
    pd.testing.assert_frame_equal(
        clip_scores(images, "a cat and a dog", local_clip), clip_scores(images, "a cat and a dog", clip)
    )
    assert local_blip.caption(images) == blip.caption(images)


def test_score_command_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["score", str(tmp_path), "--clip", "tiny", "--blip", "tiny"])
    assert exit_.value.code == 2 and "no images (.png, .jpg, .jpeg) under" in capsys.readouterr().err
    _folder(tmp_path, {"a cat and a dog": [0]})
    with pytest.raises(SystemExit):
        main(["score", str(tmp_path), "--clip", "nobody/no-such-clip", "--blip", "none"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CLIP model 'nobody/no-such-clip' is not a local directory" in err
    assert not (tmp_path / "metrics.parquet").exists()


def test_score_command_writes_and_then_refuses_mixed_models(tmp_path, capsys):
    _folder(tmp_path, {"a cat and a dog": [0, 1]})
    with pytest.raises(SystemExit) as done:
        main(["score", str(tmp_path), "--clip", "tiny", "--blip", "tiny"])
    assert done.value.code == 0
    assert "2 image(s) scored, 0 already scored" in capsys.readouterr().out
    frame = pd.read_parquet(tmp_path / "metrics.parquet")
    assert len(frame) == 2 and frame[["full_prompt", "min_object", "text_text"]].notna().all().all()
    with pytest.raises(SystemExit) as done:  # without BLIP: nothing is missing, nothing is mixed
        main(["score", str(tmp_path), "--clip", "tiny", "--blip", "none"])
    assert done.value.code == 0 and "0 image(s) scored, 2 already scored" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["score", str(tmp_path), "--clip", "someone/other-clip", "--blip", "tiny"])
    assert (
        done.value.code == 2
        and "was scored with clip ['tiny'], not 'someone/other-clip'; pass --rescore" in capsys.readouterr().err
    )


def test_the_binding_margin_compares_each_colour_on_its_own_object_with_the_others(clip):
    """A stand-in CLIP whose image embedding is the text embedding of "a red car": the margin of "a monkey and a red
    car" is CLIP("a red car") - CLIP("a red monkey") > 0 for it, NaN without a colour."""
    from anelab.metrics import binding_scores
    from anelab.prompts import attribute_pairs

    assert attribute_pairs("a monkey and a red car") == ([("red", "car")], ["monkey", "car"])
    assert attribute_pairs("a pink crown and a purple bow") == (
        [("pink", "crown"), ("purple", "bow")],
        ["crown", "bow"],
    )
    target = clip.embed_prompt("a red car")
    clip.embed_images = lambda images, *a: target[None].expand(len(images), -1)
    try:
        scores = binding_scores([None, None], ["a monkey and a red car", "a cat and a dog"], clip)
    finally:
        del clip.embed_images
    expected = float(target @ clip.embed_prompt("a red car") - target @ clip.embed_prompt("a red monkey"))
    assert scores.binding[0] == pytest.approx(expected) and expected > 0 and np.isnan(scores.binding[1])
