"""Planning and splitting a whole report: counts per notebook, repeats made once, shards filling one store,
and a final report that only analyses."""

import pytest

from anelab.cli import main
from anelab.metrics import Scorers
from anelab.runs import Store, load_study
from anelab.runs.protocol import Context, generate_report, plan_report, studies_of

NOTEBOOKS = ["01_reproduction", "03_timesteps"]


def _smoke_images(name):
    study = load_study(name, scale="smoke")
    return len(study.variants) * len(study.prompts) * len(study.seeds)


def test_the_plan_counts_every_image_once_and_the_shards_fill_the_store(tiny_pipe, tmp_path):
    store, context = Store(tmp_path / "store"), Context.of("tiny", device="cpu")
    assert studies_of(NOTEBOOKS) == ["timesteps", "reproduction"]  # the generation order
    plan, source = plan_report(NOTEBOOKS, scale="smoke", context=context, store=store)
    rows = plan.set_index("notebook")
    total = _smoke_images("reproduction") + _smoke_images("timesteps")
    # plain SD and the default A&E of reproduction are the timesteps study's sd and default: made once
    repeats = 2 * len(load_study("reproduction", scale="smoke").prompts)
    assert (
        rows.loc["01_reproduction", "images"] == _smoke_images("reproduction") and rows.loc["total", "images"] == total
    )
    assert rows.loc["total", "to_generate"] == total - repeats and rows.loc["total", "in_store"] == 0
    assert f"{repeats} repeats made once" in rows.loc["total", "note"] and "assumed 0.5 s/image" in source
    scorers = Scorers("tiny", None, None)
    for shard in ((1, 2), (0, 2)):  # two array tasks, one after the other here
        generate_report(NOTEBOOKS, scale="smoke", pipe=tiny_pipe, model="tiny", runs=tmp_path / "views", store=store,
                        shard=shard, scorers=scorers, progress=False)  # fmt: skip
    after = plan_report(NOTEBOOKS, scale="smoke", context=context, store=store)[0].set_index("notebook")
    assert after.loc["total", "to_generate"] == 0 and after.loc["total", "in_store"] == total - repeats
    assert len(store.read("rows", columns=["key"])) == total - repeats  # nothing made twice
    assert (
        len(store.read("clip", columns=["key"])) == total - repeats
    )  # each image scored once, by the shard that made it or another


def test_the_report_command_plans_and_refuses_a_shard_without_generate_only(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["report", "--plan", "--size", "quick", "--only", "01", "--store", str(tmp_path / "store")])
    out = capsys.readouterr().out
    assert (
        done.value.code in (None, 0)
        and "plan of the quick report on tiny" in out
        and "01_reproduction" in out
        and "total" in out
    )
    with pytest.raises(SystemExit) as done:
        main(["report", "--shard", "1/4", "--only", "01"])
    assert (
        done.value.code == 2 and "--shard splits the generation: use it with --generate-only" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit) as done:
        main(["report", "--size", "huge"])
    assert done.value.code == 2 and "--size must be one of smoke, quick, full" in capsys.readouterr().err


def test_the_plan_counts_the_methods_study():
    """Notebook 07's study: plain SD and seven method variants on the same prompts and seeds (quick: SynGen only on the
    prompts with a colour, the others everywhere)."""
    plan, _ = plan_report(["07_methods"], scale="quick", context=Context.of("tiny", device="cpu"), store=Store())
    row = plan.set_index("notebook").loc["07_methods"]
    study = load_study("methods", scale="quick")
    coloured = sum(any(m for _, m in s) for s in study.prompts.subjects)
    assert row.studies == "methods" and row.images == (7 * len(study.prompts) + coloured) * len(study.seeds)
