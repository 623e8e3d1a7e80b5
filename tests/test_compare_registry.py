"""`pipeline.lib.tracking.compare` (runs table) and `pipeline.lib.tracking.registry` (promote to @champion) on a real MLflow
SQLite store filled by the real stages on tiny data (32 px, alpha 0.35, no weights)."""

from __future__ import annotations

import io

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipeline import compare, registry
from pipeline.evaluate import evaluate
from pipeline.featurize import featurize
from pipeline.lib.data.prepared import PreparedDataset
from pipeline.lib.files import read_json
from pipeline.lib.tracking.compare import DEFAULT_PARAMS, METRICS, render, runs_table
from pipeline.lib.tracking.registry import promote
from pipeline.prepare import prepare
from pipeline.train import train
from tests.conftest import tiny_config

# trains three pipeline runs first (about a minute)
pytestmark = pytest.mark.slow

MODEL = "toy-truck-classifier"
EXPERIMENT = "toy-trucks"
# (train.C, train.label_smoothing) of the three pipeline runs
SETTINGS = [(0.001, 0.0), (0.01, 0.1), (0.05, 0.0)]
# On 12 random-weight test images the real test accuracies often tie, so the sort and promote
# checks use values logged onto the real runs (step 1: the latest value, which is what MLflow
# reports and orders by): the best is the *middle* run, so neither "first" nor "newest" passes.
TEST_ACCURACY = [0.50, 0.90, 0.70]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """prepare + featurize once; train + evaluate three times into one store (three runs, three
    versions of the registered model); a sweep-like parent run with two of them as children."""
    tmp = tmp_path_factory.mktemp("compare")
    prepare(tiny_config(tmp))
    featurize(tiny_config(tmp))
    # random-weight features are all alike, so every head would be the same bytes (registered
    # once): each run trains on its own noise added to them, three different models
    features = tmp / "data" / "features" / "train.npy"
    alike = np.load(features)
    run_ids = []
    for i, (c, smoothing) in enumerate(SETTINGS):
        noise = np.random.default_rng(i).normal(0, 1, alike.shape)
        np.save(features, (alike + noise).astype(alike.dtype))
        cfg = tiny_config(
            tmp,
            **{"train.C": c, "train.label_smoothing": smoothing, "tracking.run_name": f"run-{i}"},
        )
        train(cfg)
        evaluate(cfg)
        run_ids.append(read_json(cfg.paths.run_file)["run_id"])
    uri = cfg.tracking.uri
    client = mlflow.MlflowClient(tracking_uri=uri)
    for run_id, value in zip(run_ids, TEST_ACCURACY, strict=False):
        client.log_metric(run_id, "test_accuracy", value, step=1)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    parent = client.create_run(experiment_id, run_name="sweep parent", tags={"sweep": "parent"})
    client.set_terminated(parent.info.run_id)
    for run_id in run_ids[1:]:
        client.set_tag(run_id, "mlflow.parentRunId", parent.info.run_id)
    return {
        "tmp": tmp,
        "cfg": cfg,
        "uri": uri,
        "client": client,
        "run_ids": run_ids,
        "parent": parent.info.run_id,
    }


def parse_markdown(text: str) -> pd.DataFrame:
    lines = [line for line in text.splitlines() if line.strip()]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    assert set("".join(cells[1])) <= set(":-")  # the separator row
    return pd.DataFrame(cells[2:], columns=cells[0])


# -- compare ----------------------------------------------------------------------------------


def test_table_has_one_row_per_run_sorted_by_metric(store):
    df = runs_table(store["client"], EXPERIMENT)
    run_ids, parent = store["run_ids"], store["parent"]
    assert len(df) == 4 and set(df["run_id"]) == {*run_ids, parent}
    # best test accuracy first; the parent run has no metrics: last, with empty cells
    assert list(df["run_id"]) == [run_ids[1], run_ids[2], run_ids[0], parent]
    assert list(df["test_accuracy"][:3]) == sorted(TEST_ACCURACY, reverse=True)
    assert df.iloc[3][list(METRICS)].isna().all() and df.iloc[3]["run"] == "sweep parent"
    assert list(df.columns) == ["run", "run_id", "status", *DEFAULT_PARAMS, *METRICS, "duration_s"]
    by_id = df.set_index("run_id")
    for run_id, (c, smoothing) in zip(run_ids, SETTINGS, strict=False):
        row = by_id.loc[run_id]
        assert row["train.C"] == str(c) and row["train.label_smoothing"] == str(smoothing)
        assert row["train.solver"] == "auto"
        assert row["model.alpha"] == "0.35" and row["model.weights"] == "null"
        assert row["status"] == "FINISHED" and row["duration_s"] > 0
        assert 0 <= row["final_val_accuracy"] <= 1 and 0 <= row["test_macro_f1"] <= 1


def test_sort_by_another_metric_ascending_and_limit(store):
    client = store["client"]
    # train_seconds is real and differs between runs; it is added as a column
    df = runs_table(client, EXPERIMENT, sort="train_seconds", ascending=True)
    seconds = {r: client.get_run(r).data.metrics["train_seconds"] for r in store["run_ids"]}
    assert list(df["run_id"][:3]) == sorted(seconds, key=seconds.get)
    assert pd.isna(df["train_seconds"].iloc[3])  # missing last, ascending too
    # ... and by the store, so a limit keeps the runs that have the metric
    assert set(
        runs_table(client, EXPERIMENT, sort="train_seconds", ascending=True, limit=3)["run_id"]
    ) == set(store["run_ids"])
    top = runs_table(client, EXPERIMENT, limit=2)
    assert list(top["run_id"]) == [store["run_ids"][1], store["run_ids"][2]]
    chosen = runs_table(client, EXPERIMENT, params=["train.C", "no.such.param"])
    assert "model.alpha" not in chosen and chosen["no.such.param"].isna().all()


def test_parent_selects_the_sweep_children(store):
    client, run_ids = store["client"], store["run_ids"]
    df = runs_table(client, EXPERIMENT, parent=store["parent"])
    assert list(df["run_id"]) == [run_ids[1], run_ids[2]]
    short = runs_table(client, EXPERIMENT, parent=store["parent"][:8])  # as the table shows it
    assert list(short["run_id"]) == list(df["run_id"])


def test_markdown_and_csv_parse_back(store):
    df = runs_table(store["client"], EXPERIMENT)
    md = parse_markdown(render(df, "markdown"))
    assert list(md.columns) == list(df.columns) and len(md) == len(df)
    assert list(md["run_id"]) == [r[:8] for r in df["run_id"]]
    assert [float(v) for v in md["test_accuracy"][:3]] == pytest.approx([0.9, 0.7, 0.5])
    assert md.iloc[3]["test_accuracy"] == "" and md.iloc[3]["train.C"] == ""
    assert list(md["train.C"][:3]) == ["0.01", "0.05", "0.001"]  # not reformatted
    csv = pd.read_csv(io.StringIO(render(df, "csv")), dtype={"train.C": str})
    assert list(csv["run_id"]) == list(df["run_id"])  # full ids
    assert csv["test_accuracy"].tolist()[:3] == pytest.approx([0.9, 0.7, 0.5])
    assert pd.isna(csv["test_accuracy"].iloc[3])
    assert np.allclose(csv["final_val_accuracy"][:3], df["final_val_accuracy"][:3])


def test_compare_cli(store, tmp_path, capsys):
    out = tmp_path / "runs.csv"
    assert (
        compare.main(
            [
                "--tracking-uri",
                store["uri"],
                "--format",
                "csv",
                "--output",
                str(out),
                "--parent",
                store["parent"],
                "--sort",
                "final_val_accuracy",
            ]
        )
        == 0
    )
    assert set(pd.read_csv(out)["run_id"]) == set(store["run_ids"][1:])
    assert compare.main(["--tracking-uri", store["uri"], "--limit", "1"]) == 0
    printed = capsys.readouterr().out
    assert store["run_ids"][1][:8] in printed and len(printed.strip().splitlines()) == 3


def test_compare_cli_errors_name_the_thing(store, tmp_path, capsys):
    assert compare.main(["--tracking-uri", store["uri"], "--experiment", "no-such-exp"]) == 2
    err = capsys.readouterr().err
    assert "no-such-exp" in err and EXPERIMENT in err  # and lists what is there
    missing = tmp_path / "nowhere" / "mlflow.db"
    assert compare.main(["--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not missing.exists() and not missing.parent.exists()  # no empty store created
    assert compare.main(["--tracking-uri", store["uri"], "--parent", "ffff0000"]) == 2
    assert "ffff0000" in capsys.readouterr().err


# -- registry ---------------------------------------------------------------------------------


def version_of(client, run_id: str):
    [version] = [v for v in client.search_model_versions(f"name = '{MODEL}'") if v.run_id == run_id]
    return version


def test_promote_picks_the_version_of_the_best_run(store):
    client, run_ids = store["client"], store["run_ids"]
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 3
    lines: list[str] = []
    promoted = promote(client, MODEL, echo=lines.append)
    best = version_of(client, run_ids[1])
    assert promoted.version == best.version and promoted.run_id == run_ids[1]
    assert "champion" in promoted.aliases
    assert client.get_model_version_by_alias(MODEL, "champion").version == best.version
    assert f"version {best.version}" in lines[0] and run_ids[1] in lines[0]
    assert "test_accuracy=0.9" in lines[0]

    # lowest instead: the first run; the previous holder of the alias is reported
    lines.clear()
    worst = promote(client, MODEL, alias="champion", ascending=True, echo=lines.append)
    assert worst.run_id == run_ids[0]
    assert f"Previous @champion: version {best.version}" in lines[1]
    promote(client, MODEL, echo=None)  # back to the best
    assert client.get_model_version_by_alias(MODEL, "champion").version == best.version


def test_promote_ties_go_to_the_newest_version(store):
    client, run_ids = store["client"], store["run_ids"]
    for run_id in (run_ids[0], run_ids[2]):
        client.log_metric(run_id, "tie_metric", 1.0)
    client.log_metric(run_ids[1], "tie_metric", 0.5)
    promoted = promote(client, MODEL, metric="tie_metric", alias="tied", echo=None)
    assert promoted.run_id == run_ids[2]
    assert int(promoted.version) == max(
        int(v.version) for v in client.search_model_versions(f"name = '{MODEL}'")
    )


def test_champion_loads_with_pyfunc_and_predicts(store):
    client = store["client"]
    promote(client, MODEL, echo=None)
    mlflow.set_tracking_uri(store["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    assert model.metadata.run_id == store["run_ids"][1]
    images = np.asarray(PreparedDataset(store["cfg"].paths.prepared).images("test"), np.float32)
    out = model.predict(images)  # the serving model: label, probability, scores per image
    assert len(out) == len(images) == 12 and list(out.columns) == ["label", "probability", "scores"]
    probs = np.array([list(s.values()) for s in out["scores"]])
    assert probs.shape == (12, 6) and np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    assert list(out["label"]) == [list(s)[int(np.argmax(list(s.values())))] for s in out["scores"]]


def test_registry_cli(store, capsys):
    uri = store["uri"]
    assert registry.main(["promote", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "is now @champion" in out and store["run_ids"][1] in out
    assert registry.main(["list", "--tracking-uri", uri, "--format", "csv"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert sorted(table["version"]) == [1, 2, 3]
    champion = table[table["aliases"].fillna("").str.contains("champion")]
    assert list(champion["run_id"]) == [store["run_ids"][1]]
    assert champion["test_accuracy"].iloc[0] == pytest.approx(0.9)


def test_registry_cli_errors_name_the_thing(store, tmp_path, capsys):
    uri, client = store["uri"], store["client"]
    promote(client, MODEL, echo=None)
    champion = client.get_model_version_by_alias(MODEL, "champion").version
    assert registry.main(["promote", "--tracking-uri", uri, "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and MODEL in err
    assert registry.main(["promote", "--tracking-uri", uri, "--metric", "no_such_metric"]) == 2
    assert "no_such_metric" in capsys.readouterr().err
    assert registry.main(["list", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"]) == 2
    assert "none.db" in capsys.readouterr().err and not (tmp_path / "none.db").exists()
    # a failed promote leaves the alias alone
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion
