"""Object-level measures: the tiny detector, box conventions, non-detectable words, per-image tables."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from anelab import AnelabError
from anelab.detection import (
    DEFAULT_THRESHOLD,
    DETECTION_COLUMNS,
    Detector,
    _corners,
    all_present,
    center_distance,
    detect_subjects,
    detectable,
    detection_summary,
    load_detector,
    per_image,
    pixel_boxes,
    unit_boxes,
)

ANIMALS = "cat dog bird bear lion horse elephant monkey frog turtle rabbit mouse".split()
OBJECTS = "backpack glasses crown suitcase chair balloon bow car bowl bench clock apple".split()
BOX = ["box_x0", "box_y0", "box_x1", "box_y1"]
NON_OBJECTS = "red orange yellow green blue purple pink brown gray black white right left top bottom up down at".split()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (on a shared CPU, more threads wait on each other: ~30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def detector():
    return load_detector("tiny", device="cpu")


def _images(n, width=96, height=64, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(n)]


def test_tiny_detector_is_deterministic_with_typed_columns(detector):
    images = _images(3)
    first = detect_subjects(images, ["cat", "dog"], detector, batch_size=2)
    again = detect_subjects(images, ["cat", "dog"], detector, batch_size=3)
    pd.testing.assert_frame_equal(first, again)  # same image -> same boxes, whatever the batching
    assert list(first.columns) == DETECTION_COLUMNS
    assert len(first) == 6 and list(first.subject) == ["cat", "dog"] * 3 and list(first.image) == [0, 0, 1, 1, 2, 2]
    assert first.dtypes["present"] == "boolean" and first.dtypes["skipped"] == bool and first.dtypes["image"] == "int64"
    assert all(
        first.dtypes[c] == "float64" for c in ("score", "box_x0", "box_y0", "box_x1", "box_y1", "center_x", "center_y")
    )
    assert first.score.between(0, 1).all() and first.score.nunique() > 1
    boxes = first[BOX].to_numpy()
    assert (
        ((boxes >= 0) & (boxes <= 1)).all()
        and (boxes[:, 2] >= boxes[:, 0]).all()
        and (boxes[:, 3] >= boxes[:, 1]).all()
    )
    assert (first.present == (first.score >= DEFAULT_THRESHOLD)).all()
    assert (first.threshold == DEFAULT_THRESHOLD).all() and (first.detector == "tiny").all()
    np.testing.assert_allclose(first.center_x, (first.box_x0 + first.box_x1) / 2)
    np.testing.assert_allclose(first.center_y, (first.box_y0 + first.box_y1) / 2)


def test_inputs_paths_arrays_and_per_image_lists(detector, tmp_path):
    image = _images(1)[0]
    image.save(tmp_path / "0.png")
    frame = detect_subjects(
        [image, np.asarray(image), tmp_path / "0.png"], [["cat"], ["cat", "dog"], ["cat"]], detector
    )
    assert list(frame.image) == [0, 1, 1, 2] and list(frame.subject_index) == [0, 0, 1, 0]
    assert frame.score[frame.subject == "cat"].nunique() == 1  # the same picture three ways, same score
    # per-query scores: a query's score does not depend on the other queries of the image
    alone = detect_subjects([image], ["dog"], detector)
    assert alone.score[0] == pytest.approx(frame.score[2])


def test_threshold_is_honoured(detector):
    images = _images(2)
    assert detect_subjects(images, ["cat", "dog"], detector, threshold=0).present.all()
    assert not detect_subjects(images, ["cat", "dog"], detector, threshold=1.01).present.any()
    middle = float(detect_subjects(images, ["cat", "dog"], detector).score.median())
    frame = detect_subjects(images, ["cat", "dog"], detector, threshold=middle)
    assert (frame.present == (frame.score >= middle)).all() and 0 < frame.present.sum() < len(frame)


def test_template_sets_the_query(detector):
    frame = detect_subjects(_images(1), ["cat"], detector, template="a photo of a {}")
    assert frame["query"][0] == "a photo of a cat"
    with pytest.raises(AnelabError, match="template"):
        detect_subjects(_images(1), ["cat"], detector, template="a photo")


def test_padded_square_boxes_back_to_image_coordinates():
    # a 200 x 100 image (width x height): OWLv2 pads it at the bottom to a 200 x 200 square
    normalised = np.array([[0.25, 0.1, 0.75, 0.4], [0.0, 0.3, 0.5, 0.9]])  # corners on the square
    pixels = pixel_boxes(normalised, width=200, height=100, padded=True)
    np.testing.assert_allclose(pixels, [[50, 20, 150, 80], [0, 60, 100, 180]])
    unit = unit_boxes(pixels, width=200, height=100)
    np.testing.assert_allclose(
        unit, [[0.25, 0.2, 0.75, 0.8], [0.0, 0.6, 0.5, 1.0]]
    )  # the second reached into the padding
    # a tall image (100 x 200) is padded at the right
    np.testing.assert_allclose(
        unit_boxes(pixel_boxes([[0.1, 0.25, 0.4, 0.75]], 100, 200, True), 100, 200), [[0.2, 0.25, 0.8, 0.75]]
    )
    # OWL-ViT stretches the image to the square: normalised coordinates are image coordinates
    np.testing.assert_allclose(
        unit_boxes(pixel_boxes(normalised, 200, 100, False), 200, 100), np.clip(normalised, 0, 1)
    )
    np.testing.assert_allclose(_corners(torch.tensor([[0.5, 0.25, 0.2, 0.1]])).numpy(), [[0.4, 0.2, 0.6, 0.3]])


def test_conversion_agrees_with_the_processor_and_transformers_post_processing(detector):
    width, height = 200, 100
    image = Image.new("RGB", (width, height), (255, 255, 255))
    pixels = detector.processor(images=[image], return_tensors="pt")["pixel_values"][0]  # [3, 32, 32]
    white = pixels[:, 0, 0]
    assert torch.allclose(pixels[:, :12, :], white[:, None, None], atol=1e-3)  # the image: top half
    assert not torch.allclose(pixels[:, 20:, :], white[:, None, None], atol=0.5)  # padding: bottom half
    inputs = detector.processor(text=[["cat"]], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = detector.model(**inputs)
    for target in [(height, width), (max(width, height),) * 2]:  # transformers scales OWLv2 boxes by the padded side
        post = detector.processor.image_processor.post_process_object_detection(
            out, threshold=-1.0, target_sizes=[target]
        )[0]
        ours = pixel_boxes(_corners(out.pred_boxes[0]).numpy(), width, height, padded=True)
        np.testing.assert_allclose(ours, post["boxes"].numpy(), rtol=1e-5, atol=1e-3)
    row = detect_subjects([image], ["cat"], detector).iloc[
        0
    ]  # end to end: best box of the padded square, in image units
    best = post["boxes"][post["scores"].argmax()].numpy()
    np.testing.assert_allclose(
        row[BOX].to_numpy(float), np.clip(best / [width, height, width, height], 0, 1), atol=1e-5
    )
    assert row.score == pytest.approx(post["scores"].max().item(), abs=1e-6)


def test_owlvit_boxes_are_stretched_not_padded(tmp_path):
    from transformers import OwlViTForObjectDetection

    from anelab.testing import tiny_owl

    owlvit = Detector(*tiny_owl(kind="owlvit"), name="tiny-owlvit")
    assert not owlvit.padded
    width, height = 200, 100
    image = _images(1, width, height)[0]
    inputs = owlvit.processor(text=[["cat"]], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = owlvit.model(**inputs)
    post = owlvit.processor.image_processor.post_process_object_detection(
        out, threshold=-1.0, target_sizes=[(height, width)]
    )[0]
    np.testing.assert_allclose(
        pixel_boxes(_corners(out.pred_boxes[0]).numpy(), width, height, padded=False),
        post["boxes"].numpy(),
        rtol=1e-5,
        atol=1e-3,
    )
    row = detect_subjects([image], ["cat"], owlvit).iloc[0]
    best = post["boxes"][post["scores"].argmax()].numpy()
    np.testing.assert_allclose(
        row[BOX].to_numpy(float), np.clip(best / [width, height, width, height], 0, 1), atol=1e-5
    )
    owlvit.model.save_pretrained(tmp_path)
    owlvit.processor.save_pretrained(tmp_path)
    assert isinstance(load_detector(str(tmp_path), device="cpu").model, OwlViTForObjectDetection)


def test_detectable_words():
    assert all(detectable(w) for w in ANIMALS + OBJECTS)
    assert not any(detectable(w) for w in NON_OBJECTS)
    assert (
        detectable("Cat")
        and detectable("red car")
        and not detectable("at right")
        and not detectable("")
        and not detectable("2")
    )
    with pytest.raises(AnelabError, match="must be a word"):
        detectable(3)


def test_non_detectable_words_are_skipped_and_reported(detector):
    frame = detect_subjects(_images(2), [["cat", "right"], ["red", "at"]], detector)
    assert list(frame.skipped) == [False, True, True, True]
    assert frame.score[frame.skipped].isna().all() and frame.present[frame.skipped].isna().all()
    assert frame.box_x0[frame.skipped].isna().all() and frame.score[~frame.skipped].notna().all()
    assert len(frame.attrs["notices"]) == 1 and "['at', 'red', 'right']" in frame.attrs["notices"][0]
    assert detect_subjects(_images(1), ["cat"], detector).attrs["notices"] == []
    presence = all_present(frame)
    assert presence[0] == bool(frame.present[0]) and pd.isna(presence[1])  # nothing detectable in image 1


@pytest.mark.parametrize(
    "images, subjects, message",
    [
        ([], ["cat"], "no images"),
        ("two", ["cat"], "must be a PIL image"),
        ("one", "cat", "list of words"),
        ("two", [["cat"]] * 3, "2 images and 3 subject lists"),
        ("one", [], "no subjects"),
        ("one", [[3]], "must be a word"),
        ("one", ["cat,dog"], "comma"),
    ],
)
def test_bad_input_is_one_line_error(detector, images, subjects, message):
    images = {"one": _images(1), "two": [object(), object()]}.get(images, images) if isinstance(images, str) else images
    with pytest.raises(AnelabError, match=message):
        detect_subjects(images, subjects, detector)


def test_missing_image_file_and_bad_threshold(detector, tmp_path):
    with pytest.raises(AnelabError, match="does not exist"):
        detect_subjects([tmp_path / "missing.png"], ["cat"], detector)
    with pytest.raises(AnelabError, match="threshold"):
        detect_subjects(_images(1), ["cat"], detector, threshold=float("nan"))


def test_model_lands_on_the_device_asked_for():
    detector = load_detector("tiny", device="meta")
    assert isinstance(detector, Detector) and detector.padded
    assert all(p.device.type == "meta" for p in detector.model.parameters())
    assert not any(p.requires_grad for p in detector.model.parameters())
    assert load_detector(detector) is detector
    assert load_detector("tiny", device="cpu", dtype="bf16").model.dtype == torch.bfloat16


def test_load_from_a_saved_directory_picks_the_class_from_the_config(detector, tmp_path):
    from transformers import CLIPConfig, Owlv2ForObjectDetection

    detector.model.save_pretrained(tmp_path / "owl")
    detector.processor.save_pretrained(tmp_path / "owl")
    loaded = load_detector(str(tmp_path / "owl"), device="cpu")
    assert isinstance(loaded.model, Owlv2ForObjectDetection) and loaded.padded
    images = _images(2)
    pd.testing.assert_frame_equal(
        detect_subjects(images, ["cat"], loaded).drop(columns="detector"),
        detect_subjects(images, ["cat"], detector).drop(columns="detector"),
    )
    CLIPConfig().save_pretrained(tmp_path / "clip")
    with pytest.raises(AnelabError, match="OWLv2 or OWL-ViT.*'clip'"):
        load_detector(str(tmp_path / "clip"), device="cpu")


@pytest.mark.parametrize("spec", ["/no/such/detector", "no-such-org/no-such-detector", 3])
def test_unknown_spec_is_an_anelab_error(spec):
    with pytest.raises(AnelabError):
        load_detector(spec, device="cpu")


def _hand_made():
    """Two variants x two images of 'a cat at right' / 'a cat and a dog', known presence and centres."""
    rows = []
    for variant, present in (("sd", [(True, False), (False, False)]), ("ae", [(True, True), (True, False)])):
        for image, (cat, dog) in enumerate(present):
            common = dict(
                variant=variant,
                category="animal_animal",
                prompt="a cat and a dog",
                seed=image,
                image=image,
                skipped=False,
            )
            rows.append(
                {
                    **common,
                    "subject_index": 0,
                    "subject": "cat",
                    "score": 0.9 if cat else 0.1,
                    "present": cat,
                    "center_x": 0.8,
                    "center_y": 0.5,
                }
            )
            rows.append(
                {
                    **common,
                    "subject_index": 1,
                    "subject": "dog",
                    "score": 0.7 if dog else 0.2,
                    "present": dog,
                    "center_x": 0.2,
                    "center_y": 0.1,
                }
            )
            rows.append(
                {
                    **common,
                    "subject_index": 2,
                    "subject": "right",
                    "skipped": True,
                    "score": np.nan,
                    "present": pd.NA,
                    "center_x": np.nan,
                    "center_y": np.nan,
                }
            )
    return pd.DataFrame(rows).astype({"present": "boolean"})


def test_per_image_and_all_present_on_a_hand_made_frame():
    frame = _hand_made()
    table = per_image(frame)
    assert list(table.columns[:5]) == ["variant", "category", "prompt", "seed", "image"]
    assert list(table.n_subjects) == [2, 2, 2, 2]
    assert list(table.all_present) == [0.0, 0.0, 1.0, 0.0]
    assert list(table.present_0) == [1.0, 0.0, 1.0, 1.0] and list(table.present_1) == [0.0, 0.0, 1.0, 0.0]
    assert table.present_2.isna().all() and list(table.score_1) == [0.2, 0.2, 0.7, 0.2]
    assert list(all_present(frame)) == [False, False, True, False]
    with pytest.raises(AnelabError, match="rows repeat"):
        per_image(pd.concat([frame, frame]))


def test_detection_summary_reuses_summarize():
    summary = detection_summary(_hand_made())
    assert set(summary.columns) >= {"variant", "category", "measure", "n", "mean", "ci_low", "ci_high"}
    row = summary.query("variant == 'ae' and category == 'overall' and measure == 'all_present'").iloc[0]
    assert row.n == 2 and row["mean"] == 0.5
    assert summary.query("variant == 'sd' and measure == 'present_0'")["mean"].tolist() == [0.5, 0.5]
    assert set(summary.measure) == {"all_present", "present_0", "present_1"}
    with pytest.raises(AnelabError, match="lacks"):
        detection_summary(_hand_made().drop(columns="category"))


def test_center_distance():
    frame = _hand_made()
    cat = center_distance(frame, "cat", (0.5, 0.1))  # cat's centre (0.8, 0.5): hypot(0.3, 0.4) = 0.5
    np.testing.assert_allclose(cat.to_numpy(), [0.5, np.nan, 0.5, 0.5])  # NaN where the cat is absent
    assert cat.index.names == ["variant", "category", "prompt", "seed", "image"] and cat.name == "center_distance"
    np.testing.assert_allclose(
        center_distance(frame, 1, (0.5, 0.1)).to_numpy(), [np.nan, np.nan, 0.3, np.nan]
    )  # by position
    assert center_distance(frame, "right", (0.5, 0.5)).isna().all()  # skipped
    with pytest.raises(AnelabError, match="not in this detection table"):
        center_distance(frame, "horse", (0.5, 0.5))
    with pytest.raises(AnelabError, match="two finite numbers"):
        center_distance(frame, "cat", (0.5,))
