"""The shared run store under hostile conditions: links planted inside it, many first writers at once, damaged or
missing images, a store of another format, rows of an older schema."""

import multiprocessing
import os

import pandas as pd
import pytest

from anelab import AnelabError
from anelab.runs import Store, load_results, load_study, run_sweep, score_run
from anelab.runs.store import FORMAT

TINY_STUDY = {
    "name": "two",
    "prompts": [{"prompt": "a cat and a dog", "tokens": ["cat", "dog"]}],
    "seeds": 2,
    "steps": 3,
    "size": 128,
    "batch": 1,
    "base": {"attention_res": 8, "thresholds": {}, "max_iter_to_alter": 1},
    "variants": {"sd": None, "ae": {}},
}


def test_a_lock_owner_file_planted_as_a_link_is_replaced_not_followed(tmp_path):
    store, victim = Store(tmp_path / "store"), tmp_path / "victim.txt"
    store.prepare()
    victim.write_text("precious")
    block = "ab" + "0" * 62
    owner = store.root / "locks" / "ab" / f"{block}.owner"
    owner.parent.mkdir(parents=True)
    owner.symlink_to(victim)
    lock = store.try_lock(block)
    lock.release()
    assert victim.read_text() == "precious" and not owner.is_symlink() and "pid" in owner.read_text()


def test_a_folder_link_planted_inside_the_store_is_refused_in_one_line(tmp_path):
    store, elsewhere = Store(tmp_path / "store"), tmp_path / "elsewhere"
    store.prepare()
    elsewhere.mkdir()
    (store.root / "locks").mkdir(exist_ok=True)
    (store.root / "locks" / "cd").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(AnelabError, match="is a symbolic link inside .*anelab writes nothing through links"):
        store.try_lock("cd" + "1" * 62)
    assert not any(elsewhere.iterdir())


def _prepare(root):
    Store(root).prepare()


def test_many_first_writers_create_one_store_without_refusing_each_other(tmp_path):
    root = tmp_path / "new-store"
    context = multiprocessing.get_context("spawn")
    with context.Pool(6) as pool:
        pool.map(_prepare, [root] * 24)  # a SLURM array's first seconds: every task creates the store at once
    assert (root / "STORE.json").is_file() and (root / "tables" / "rows").is_dir()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(AnelabError, match="is not empty and is not a run store .*notes.txt"):
        Store(tmp_path / "foreign").prepare()


def test_a_store_of_another_format_is_refused_and_an_old_rows_schema_is_read(tmp_path):
    store = Store(tmp_path / "store")
    store.prepare()
    (store.root / "STORE.json").write_text('{"format": "anelab-store/9"}')
    with pytest.raises(AnelabError, match=f"is of format 'anelab-store/9'; this anelab reads '{FORMAT}'"):
        store.prepare()
    (store.root / "STORE.json").write_text(f'{{"format": "{FORMAT}"}}')
    old = pd.DataFrame({"key": ["k1"], "prompt": ["p"], "seed": [0], "write": ["w"], "written": [1]})  # no recorded
    old.to_parquet(store.root / "tables" / "rows" / "w.parquet")
    rows = store.latest_rows(["k1"], columns=["recorded", "image_bytes"])
    assert rows.recorded.isna().all() and rows.image_bytes.isna().all()


@pytest.fixture()
def swept(tmp_path, tiny_pipe):
    store, out = Store(tmp_path / "store"), tmp_path / "view"
    study = load_study(TINY_STUDY)
    first = run_sweep(study, tiny_pipe, out, model="tiny", store=store, progress=False)
    assert first["images"] == 4
    return study, store, out


def test_a_damaged_or_missing_image_is_made_again_and_never_served(swept, tiny_pipe):
    study, store, out = swept
    rows = store.latest_rows(columns=["image_bytes", "image_sha256"]).sort_values("key")
    cut, gone = rows.key.iloc[0], rows.key.iloc[1]
    path = store.image(cut)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut in half
    store.image(gone).unlink()  # deleted
    with pytest.warns(UserWarning, match="2 image\\(s\\) .* are missing or damaged in the store and left out"):
        assert len(load_results(out)) == 2
    again = run_sweep(study, tiny_pipe, out, model="tiny", store=store, progress=False)
    assert again["images"] == 2 and again["already"] == 2  # exactly the two, made again
    assert len(load_results(out)) == 4
    same_size = store.image(cut)
    size = same_size.stat().st_size
    same_size.write_bytes(os.urandom(size))  # garbage of the same size: caught by the checksum when read for scoring
    from anelab.metrics import Scorers

    with pytest.warns(UserWarning, match=f"damaged store image {cut}"):
        done = score_run(out, Scorers("tiny", None, None), progress=False)
    assert done["counts"]["clip"]["scored"] == 3 and any("set aside" in n for n in done["notices"])
    remade = run_sweep(study, tiny_pipe, out, model="tiny", store=store, progress=False)
    assert remade["images"] == 1


def test_every_field_of_the_store_identity_changes_the_key():
    """A mutation of the identity (a field dropped, or not passed through) fails here: each field alone moves the key."""
    from anelab import methods
    from anelab.runs.store import block_identity, image_key
    from anelab.subjects import Subject

    base = dict(
        model="tiny/1", dtype="float32", device="cpu", scheduler="PNDMScheduler", iterations=6,
        prompt="a cat and a dog", subjects=(Subject("cat"), Subject("dog")), seeds=(0, 1), steps=5, height=128,
        width=128, guidance_scale=7.5, method=methods.get("attend_and_excite"), generator_device="cpu",
    )  # fmt: skip
    changed = dict(
        model="tiny/2", dtype="float16", device="cuda", scheduler="DDIMScheduler", iterations=5, prompt="a cat",
        subjects=(Subject("cat"),), seeds=(0, 2), steps=6, height=256, width=256, guidance_scale=5.0,
        method=methods.get("attend_and_excite", scale_factor=10.0), generator_device="cuda",
    )  # fmt: skip
    identity = block_identity(**base)
    assert set(identity) == {
        "format", "model", "dtype", "device", "scheduler", "prompt", "tokens", "suppress", "layout", "seeds", "steps",
        "height", "width", "guidance_scale", "config", "generator_device",
    }  # fmt: skip
    key = image_key(identity, 0)
    for field, value in changed.items():
        assert image_key(block_identity(**(base | {field: value})), 0) != key, field
    for subjects in (
        (Subject("cat"), Subject("dog", role="suppress")),
        (Subject("cat", target=(0.2, 0.5)), Subject("dog")),
    ):
        assert image_key(block_identity(**(base | {"subjects": subjects})), 0) != key
    assert image_key(identity, 1) != key  # the seed
    assert image_key(block_identity(**(base | {"method": None})), 0) != key  # plain SD
