"""The real entry point through real Ray workers: a 2-epoch smoke run, outputs, and resume from a checkpoint; the
bench's bookkeeping, in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from djc import cli
from djc.runfiles import read_assignments, read_jsonl

pytestmark = pytest.mark.slow

JOB = str(Path(__file__).resolve().parents[1] / "jobs" / "digits_lt.yaml")


def _small(tmp: Path, epochs: int) -> list[str]:
    return [f"data.train={tmp}/data/train", f"data.eval={{test: {tmp}/data/test}}", f"optim.epochs={epochs}",
            "model.width=8", "method.secu.num_heads=2", "optim.warmup_epochs=1", "method.kmeans.restarts=1"]


def test_train_smoke_then_resume(ray_local, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", JOB, "--out", str(out), *_small(tmp_path, 2)]) == 0
    printed = capsys.readouterr().out
    assert "balanced_acc" in printed and "kmeans-pixels" in printed

    # The run dir holds what the README's run-dir table promises.
    for name in ("config.yaml", "metrics.jsonl", "metrics.json", "assignments.parquet",
                 "plots/cluster_sizes_train.png", "plots/confusion_test.png"):
        assert (out / name).is_file(), name
    lines = read_jsonl(str(out / "metrics.jsonl"))
    assert [m["epoch"] for m in lines] == [1, 2]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("acc", "nmi", "ari", "balanced_acc", "macro_f1", "head_acc", "medium_acc", "tail_acc",
                "min_cluster_size", "max_cluster_size", "empty_clusters", "size_entropy"):
        assert key in metrics and key in metrics["baseline"], key
    assert set(metrics["splits"]) == {"train", "test"}
    table = read_assignments(str(out / "assignments.parquet"))
    n_train = int((table["split"] == "train").sum())
    assert sorted(table["index"][table["split"] == "train"].tolist()) == list(range(n_train))

    # Same --out with more epochs: continues from the epoch-2 checkpoint instead of starting over (a restart
    # from scratch would log epochs 1, 2, 1, 2, 3), with the global step carried on.
    assert cli.main(["train", JOB, "--out", str(out), *_small(tmp_path, 3)]) == 0
    lines = read_jsonl(str(out / "metrics.jsonl"))
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    assert lines[2]["step"] == 3 * lines[0]["step"]


@pytest.mark.parametrize("override, message", [
    (["method.secu.gama=1"], "unknown config key 'method.secu.gama'"),
    (["method.num_clusters=300"], "larger than the global batch"),
    (["data.source=", "data.train=/nonexistent/ds"], "no dataset at /nonexistent/ds"),
])
def test_bad_input_exits_nonzero_with_a_clear_message(tmp_path, capsys, override, message):
    assert cli.main(["train", JOB, "--out", str(tmp_path / "r"), *override]) == 2
    assert message in capsys.readouterr().err


def test_a_manifest_whose_shard_is_missing_is_refused_before_training(tmp_path, capsys):
    from djc.data.prepare import prepare

    m = prepare("digits", str(tmp_path / "ds"), imbalance_ratio=10, progress=False)
    (tmp_path / "ds" / m.shards[0].path).unlink()
    code = cli.main(["train", JOB, "--out", str(tmp_path / "r"), "data.source=", f"data.train={tmp_path}/ds",
                     "data.eval={}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "shard" in err and m.shards[0].path in err and "missing" in err


# The bench's own bookkeeping (its table, pairs, --reuse, --stages) trains in process (--in-process: 30-45 s a Ray
# fit on 2 cores, 213 s for the pair test's five); tests/test_in_process.py shows that runner's epochs are a Ray
# worker's, parameter for parameter.
IN_PROCESS = ["trainer.in_process=true", "trainer.num_workers=1"]


def test_bench_quality_tabulates_methods_and_baselines_per_data_set(tmp_path, capsys):
    out = tmp_path / "bench"
    code = cli.main(["bench", "quality", "--config", JOB, "--data", f"tiny:data.train={tmp_path}/data/train",
                     "--seeds", "1", "--out", str(out), *_small(tmp_path, 1)[1:], *IN_PROCESS])
    assert code == 0
    table = (out / "quality.md").read_text().splitlines()
    rows = {tuple(c.strip() for c in line.split("|")[1:4]) for line in table[2:]}
    for split in ("train", "test"):
        for method in ("secu", "kmeans-pixels", "kmeans-features (secu)", "knn-merge (secu)", "knn-merge-pixels"):
            assert ("tiny", split, method) in rows
    assert "± 0.000" in table[2]  # one seed: std 0
    assert "1 runs in" in capsys.readouterr().out


def _cell(line: str, column: int) -> float:
    """A quality.md row's mean in one column (0: data set; 3: the first metric, balanced ACC)."""
    return float(line.split("|")[column + 1].split("±")[0])


def test_bench_refuses_a_malformed_data_set(capsys):
    assert cli.main(["bench", "quality", "--data", "no-colon"]) == 2
    assert "NAME:key=v" in capsys.readouterr().err


def test_bench_quality_runs_the_pretext_pair_on_a_frozen_cached_encoder(tmp_path, capsys):
    """The two-stage recipe: a pretext run (contrastive, no clustering term), then P2OT on its frozen encoder
    (model.weights = the pretext run dir), features computed once, beside P2OT from scratch."""
    jobs = Path(JOB).parent
    out = tmp_path / "bench"
    code = cli.main(["bench", "quality", "--config", str(jobs / "digits_lt_p2ot.yaml"),
                     "--pretext", str(jobs / "digits_lt_pretext.yaml"),
                     "--data", f"tiny:data.train={tmp_path}/data/train",
                     "--seeds", "1", "--out", str(out), f"data.eval={{test: {tmp_path}/data/test}}", "optim.epochs=1",
                     "optim.warmup_epochs=0", "model.width=8", "method.kmeans.restarts=1", *IN_PROCESS])
    assert code == 0
    table = (out / "quality.md").read_text().splitlines()
    rows = {tuple(c.strip() for c in line.split("|")[1:4]): line for line in table[2:]}
    for method in ("p2ot", "p2ot (pretext)", "kmeans-encoder (pretext)", "kmeans-pixels"):
        assert ("tiny", "train", method) in rows, method
    minutes = [float(rows["tiny", "train", m].split("|")[-2].split("±")[0]) for m in ("p2ot", "p2ot (pretext)")]
    assert all(m > 0 for m in minutes)  # each row has its wall time; the pair's includes the pretext run's
    # pairs.md: the pair against its bar, seed by seed (the pair's balanced ACC minus k-means' on the same pretext
    # features); the from-scratch run has no bar, so no row.
    against = {tuple(cells[:3]): cells[3:6] for cells in ([c.strip() for c in line.split("|")[1:]]
                                                         for line in (out / "pairs.md").read_text().splitlines()[2:])}
    assert set(against) == {("tiny", split, "p2ot (pretext)") for split in ("train", "test")}
    mean, seed0, count = against["tiny", "train", "p2ot (pretext)"]
    pair_acc, bar_acc = (_cell(rows["tiny", "train", m], 3) for m in ("p2ot (pretext)", "kmeans-encoder (pretext)"))
    assert mean.endswith("± 0.000") and abs(float(seed0) - (pair_acc - bar_acc)) < 0.0015  # means to 3 decimals
    assert count == ("1 of 1" if float(seed0) > 0 else "0 of 1") or abs(float(seed0)) < 0.001
    run = out / "tiny" / "digits_lt_p2ot-on-pretext-seed0"
    cfg = (run / "config.yaml").read_text()
    assert str(out / "tiny" / "digits_lt_pretext-seed0") in cfg and "freeze: all" in cfg
    assert list((run / "features").glob("train-*.pt")) and list((run / "features").glob("test-*.pt"))

    # --reuse --stages pairs --pretext-head: the pretext run (same config, finished) is read back, not rerun; the
    # pair's config changed (model.weights_head) so it runs; no from-scratch run. Then everything is reused.
    capsys.readouterr()
    again = ["bench", "quality", "--config", str(jobs / "digits_lt_p2ot.yaml"), "--pretext",
             str(jobs / "digits_lt_pretext.yaml"), "--data", f"tiny:data.train={tmp_path}/data/train", "--seeds", "1",
             "--out", str(out), f"data.eval={{test: {tmp_path}/data/test}}", "optim.epochs=1", "optim.warmup_epochs=0",
             "model.width=8", "method.kmeans.restarts=1", "--reuse", "--stages", "pairs", "--pretext-head", *IN_PROCESS]
    pretext_ckpt = sorted((out / "tiny" / "digits_lt_pretext-seed0" / "train").glob("checkpoint_*"))
    assert cli.main(again) == 0
    printed = capsys.readouterr().out
    assert printed.count("reused") == 1 and "2 runs in" in printed
    assert sorted((out / "tiny" / "digits_lt_pretext-seed0" / "train").glob("checkpoint_*")) == pretext_ckpt
    assert "weights_head: true" in (out / "tiny" / "digits_lt_p2ot-on-pretext-head-seed0" / "config.yaml").read_text()
    table = (out / "quality.md").read_text().splitlines()[2:]
    rows = {tuple(c.strip() for c in line.split("|")[1:4]) for line in table}
    assert ("tiny", "train", "p2ot (pretext)") in rows and ("tiny", "train", "p2ot") not in rows
    assert cli.main(again) == 0
    assert capsys.readouterr().out.count("reused") == 2

    # --pair-views augmented: the pair keeps the config's own views, so the frozen encoder runs on augmented
    # images every step and nothing is cached; a run dir of its own, the pretext read back again.
    assert cli.main([*again, "--pair-views", "augmented"]) == 0
    assert capsys.readouterr().out.count("reused") == 1
    run = out / "tiny" / "digits_lt_p2ot-on-pretext-head-aug-seed0"
    assert "policy: none" not in (run / "config.yaml").read_text() and (run / "metrics.json").is_file()
    assert not list(run.glob("features/train-*.pt"))

    # --pair-neighbors: set on the pair alone (the pretext, which would refuse it, is read back), in a run dir of its
    # own; with augmented views it is refused before any run
    assert cli.main([*again, "--pair-neighbors", "2"]) == 0
    assert capsys.readouterr().out.count("reused") == 1
    run = out / "tiny" / "digits_lt_p2ot-on-pretext-head-nn2-seed0"
    assert "neighbors: 2" in (run / "config.yaml").read_text() and (run / "metrics.json").is_file()
    assert cli.main([*again, "--pair-views", "augmented", "--pair-neighbors", "2"]) == 2
    assert "--pair-neighbors 2: a count >= 0, with --pair-views cached" in capsys.readouterr().err

    # A job changed since its runs, benched into the same --out: the run dirs hold checkpoints of the old config,
    # which a run refuses to continue; the bench names the first before any run trains, and leaves it as it was.
    before = (run / "config.yaml").read_text()
    assert cli.main([*again, "--pair-neighbors", "2", "method.p2ot.eps=0.3"]) == 2
    printed = capsys.readouterr()
    assert "changes what it was trained with: method.p2ot.eps (" in printed.err and "-> 0.3)" in printed.err
    assert "Nothing ran" in printed.err and "[djc bench] run 1/" not in printed.out
    assert (run / "config.yaml").read_text() == before


def test_reuse_compares_what_a_config_changes_from_the_defaults():
    """bench quality --reuse: a config's digest is over what differs from djc's defaults, so a run from before a
    key was added (at its default) is still the same run, and any change of a value is not."""
    from djc.bench.quality import _changed, _digest
    from djc.config import load_config

    assert _changed({"a": 1, "b": {"c": 2, "d": 3}}, {"a": 1, "b": {"c": 2, "d": 4}, "e": 5}) == {"b": {"d": 3}}
    cfg = load_config(JOB, [])
    assert _digest(cfg) == _digest(load_config(JOB, [f"augment.neighbors={cfg.augment.neighbors}"]))
    assert _digest(cfg) != _digest(load_config(JOB, ["augment.neighbors=3"]))
