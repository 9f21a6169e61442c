"""djc predict and the pictures of a run: one trained run (10 epochs, in one process), predicted again in one
process and on 2 Ray workers, on a flat unlabelled folder, and its galleries and maps drawn and redrawn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from djc import cli
from djc.runfiles import read_assignments

pytestmark = pytest.mark.slow

JOB = str(Path(__file__).resolve().parents[1] / "jobs" / "digits_lt.yaml")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """SeCu on long-tailed digits for 10 epochs (at 3 or 6 its merged head is one cluster on one worker, nothing
    for the galleries to show), merged head as the job has it (predict: merge). Trained in process
    (a Ray fit cost CI 23 s here): predict's 2 Ray workers below must then reproduce a one-process run, the stronger
    check of the two, and tests/test_in_process.py shows that runner's epochs are a Ray worker's."""
    tmp = tmp_path_factory.mktemp("predict")
    out = tmp / "run"
    code = cli.main(["train", JOB, "--in-process", "--out", str(out), f"data.train={tmp}/data/train",
                     f"data.eval={{test: {tmp}/data/test}}", "optim.epochs=10", "optim.frozen_epochs=0",
                     "model.width=32", "method.secu.num_heads=2", "optim.warmup_epochs=1", "method.kmeans.restarts=1",
                     "eval.map_samples=300"])
    assert code == 0
    return out


def _rows(table: dict, split: str) -> dict:
    on = table["split"] == split
    order = np.argsort(table["index"][on])
    return {k: v[on][order] for k, v in table.items()}


def test_a_run_dir_holds_its_galleries_and_maps_and_djc_eval_redraws_them(run_dir):
    plots = run_dir / "plots"
    for split in ("train", "test"):
        for name in (f"gallery_{split}_p1.png", f"map_{split}.png"):
            w, h = Image.open(plots / name).size
            assert w > 400 and h >= 90, name  # a title and at least one cluster's row
            (plots / name).unlink()
    coords = pq.read_table(run_dir / "map.parquet").to_pydict()
    assert sum(s == "train" for s in coords["split"]) == 300  # the map's sample of the 562 train images
    assert cli.main(["eval", str(run_dir)]) == 0
    for split in ("train", "test"):
        assert (plots / f"gallery_{split}_p1.png").is_file() and (plots / f"map_{split}.png").is_file()


def test_predicting_the_train_split_reproduces_the_runs_assignments(ray_local, run_dir, tmp_path):
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    run = read_assignments(str(run_dir / "assignments.parquet"))
    for workers in (1, 2):  # this process, then 2 Ray Train workers (sharded k-means and knn-merge included)
        out = tmp_path / f"w{workers}"
        assert cli.main(["predict", str(run_dir), "--data", cfg["data"]["train"], "--out", str(out),
                         "--workers", str(workers), "--embeddings"]) == 0
        new = _rows(read_assignments(str(out / "assignments.parquet")), "train")  # the run's own split name
        old = _rows(run, "train")
        assert len(np.unique(old["cluster_h1"])) > 2  # a clustering to reproduce, not a collapse
        for col in ("index", "label", "cluster", "cluster_h1", "kmeans_features", "knn_merge"):  # the run's
            np.testing.assert_array_equal(new[col], old[col], err_msg=f"{col}, {workers} worker(s)")  # baselines too
        np.testing.assert_allclose(new["confidence"], old["confidence"], rtol=1e-6, err_msg=f"{workers} worker(s)")
        assert json.loads((out / "metrics.json").read_text())["balanced_acc"] == pytest.approx(
            json.loads((run_dir / "metrics.json").read_text())["balanced_acc"])
        z = np.load(out / "embeddings.npy")
        assert z.dtype == np.float32 and z.shape == (562, 128)  # proj_dim of the job; rows = assignments rows
        np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)


def test_djc_eval_rerun_reproduces_the_end_of_the_run_in_one_process(run_dir, tmp_path):
    """`djc eval --rerun` runs the run's end again from the final checkpoint in this process: every column of
    assignments.parquet comes out the same, the baselines' included, and a deleted metrics.json and plot come back.
    (2 workers == 1 for those columns: the predict test above.)"""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    before = read_assignments(str(copy / "assignments.parquet"))
    assert len(np.unique(before["knn_merge"])) > 2
    (copy / "metrics.json").unlink()
    (copy / "plots" / "recall_train.png").unlink()
    assert cli.main(["eval", str(copy), "--rerun"]) == 0
    after = read_assignments(str(copy / "assignments.parquet"))
    for split in ("train", "test"):
        old, new = _rows(before, split), _rows(after, split)
        for col in ("index", "label", "cluster", "cluster_h1", "kmeans_pixels", "kmeans_features", "knn_merge",
                    "knn_merge_pixels"):
            np.testing.assert_array_equal(new[col], old[col], err_msg=f"{col} on {split}")
    m = json.loads((copy / "metrics.json").read_text())
    assert m["balanced_acc"] == json.loads((run_dir / "metrics.json").read_text())["balanced_acc"]
    assert "baseline_knn_merge" in m["splits"]["test"] and (copy / "plots" / "recall_train.png").is_file()


def test_predict_on_a_flat_unlabelled_folder(run_dir, tmp_path):
    from sklearn.datasets import load_digits

    photos = tmp_path / "photos"
    photos.mkdir()
    images = (load_digits().images[:150] * 255 / 16).astype(np.uint8)  # (150, 8, 8), as djc prepare digits
    for i, im in enumerate(images):
        Image.fromarray(im).save(photos / f"scan{i:03d}.png")
    assert cli.main(["prepare", "folder", "--root", str(photos), "--out", str(tmp_path / "ds")]) == 0
    out = tmp_path / "pred"
    assert cli.main(["predict", str(run_dir), "--data", str(tmp_path / "ds"), "--out", str(out),
                     "--embeddings", "float16"]) == 0
    table = read_assignments(str(out / "assignments.parquet"))
    assert sorted(table["index"].tolist()) == list(range(150))
    assert (table["label"] == -1).all() and set(table["split"]) == {"predict"}
    assert table["cluster"].max() < 10 and ((table["confidence"] >= 0) & (table["confidence"] <= 1)).all()
    assert table["knn_merge"].max() < 10 and table["kmeans_features"].max() < 10  # the run's baselines, applied
    assert not (out / "metrics.json").exists()  # nothing to score without labels
    z = np.load(out / "embeddings.npy")
    assert z.dtype == np.float16 and z.shape == (150, 128)
    assert Image.open(out / "plots" / "gallery_predict_p1.png").size[1] >= 90
    assert Image.open(out / "plots" / "map_predict.png").size == (650, 600)  # one panel: no classes to show


def test_predict_refuses_bad_input_in_one_line(run_dir, tmp_path, capsys):
    assert cli.main(["predict", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text((run_dir / "config.yaml").read_text())  # a run dir that never trained
    assert cli.main(["eval", str(tmp_path), "--rerun"]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    (tmp_path / "config.yaml").unlink()
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(rgb / f"{i}.png")
    assert cli.main(["prepare", "folder", "--root", str(rgb), "--out", str(tmp_path / "rgb_ds")]) == 0
    assert cli.main(["predict", str(run_dir), "--data", str(tmp_path / "rgb_ds"), "--out", str(tmp_path / "o")]) == 2
    assert "has 3-channel images, the run was trained on 1-channel ones" in capsys.readouterr().err


def test_bench_selection_measures_each_run_once_and_counts_a_rerun_once(run_dir, tmp_path, capsys):
    """`djc bench selection` over the run and a copy of it (the same config and seed trained twice): both are
    measured and kept in the cache, the copy is left out of the correlation, and --cached measures nothing."""
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(run_dir, runs / "a")
    shutil.copytree(run_dir, runs / "b")
    out = tmp_path / "sel"
    assert cli.main(["bench", "selection", "--runs", str(runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count(": balanced ACC test") == 2
    assert f"left out, the same clusters as an earlier run: {runs / 'b'}" in printed
    rows = [json.loads(ln) for ln in (out / "selection_runs.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["role"] for r in rows} == {"select", "train"}  # 2 runs x (test, train)
    assert all(0.0 < r["select_stability_jaccard"] <= 1.0 for r in rows)
    a = next(r for r in rows if r["run"] == str(runs / "a") and r["role"] == "train")
    assert a["select_balanced_acc"] == pytest.approx(json.loads((run_dir / "metrics.json").read_text())["balanced_acc"])
    assert "| secu | 1 |" in (out / "selection.md").read_text()
    assert cli.main(["bench", "selection", "--runs", str(runs), "--out", str(out), "--cached"]) == 0
    assert ": balanced ACC test" not in capsys.readouterr().out  # read back, not measured again


def test_a_run_on_a_pretext_predicts_with_the_pretexts_input_side(run_dir, tmp_path):
    """A method on a frozen djc run's encoder trains on that run's input (12-px views here, the pretext's
    augment.out_size), not the 8-px images: prediction must resize as training did. It once used the images' own
    side, and on the RGB benchmark agreed with the run's own clusters on half the rows."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    data = [f"data.train={cfg['data']['train']}", f"data.eval={{test: {cfg['data']['eval']['test']}}}",
            "optim.epochs=1", "optim.frozen_epochs=0", "optim.warmup_epochs=0", "method.secu.num_heads=2",
            "method.kmeans.restarts=1", "eval.map=none", "model.width=32"]
    pretext, pair = tmp_path / "pretext", tmp_path / "pair"
    # In this process (--in-process): what is tested is prediction's input side, not Ray (two fits fewer in CI).
    assert cli.main(["train", JOB, "--in-process", "--out", str(pretext), *data, "augment.out_size=12"]) == 0
    assert cli.main(["train", JOB, "--in-process", "--out", str(pair), *data, f"model.weights={pretext}",
                     "model.freeze=all", "augment.policy=none"]) == 0
    out = tmp_path / "predicted"
    assert cli.main(["predict", str(pair), "--data", cfg["data"]["train"], "--out", str(out), "--workers", "1"]) == 0
    new = _rows(read_assignments(str(out / "assignments.parquet")), "train")
    old = _rows(read_assignments(str(pair / "assignments.parquet")), "train")
    np.testing.assert_array_equal(new["cluster_h1"], old["cluster_h1"])
