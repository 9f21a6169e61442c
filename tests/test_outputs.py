import uuid

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from matplotlib.image import imread
from PIL import Image

from djc import plots, runfiles
from djc.evaluate import evaluate_table, write_outputs
from djc.plots import plot_cluster_sizes, plot_confusion
from djc.runfiles import append_jsonl, read_assignments, read_jsonl, write_assignments, write_json
from djc.metrics import evaluate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(params=["local", "file", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path)
    elif request.param == "file":
        yield f"file://{tmp_path}"
    else:
        url = f"memory://djc-test-{uuid.uuid4().hex}"
        yield url
        fs, path = fsspec.core.url_to_fs(url)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def _listing(url):
    fs, path = fsspec.core.url_to_fs(url)
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def test_assignments_round_trip(root):
    rng = np.random.default_rng(0)
    N = 50
    clusters = rng.integers(0, 10, (N, 3))
    url = f"{root}/run/assignments.parquet"
    write_assignments(url, index=np.arange(N), clusters=clusters, confidence=rng.random(N),
                      label=rng.integers(-1, 10, N), split=np.where(np.arange(N) < 40, "train", "test"),
                      ood=rng.random(N), extra={"kmeans_pixels": rng.integers(0, 10, N)})
    t = read_assignments(url)
    assert list(t) == ["index", "split", "label", "cluster", "cluster_h1", "cluster_h2", "confidence",
                       "ood_score", "kmeans_pixels"]
    np.testing.assert_array_equal(t["cluster"], clusters[:, 0])
    np.testing.assert_array_equal(t["cluster_h2"], clusters[:, 2])
    assert t["split"][0] == "train" and t["split"][-1] == "test"
    assert t["confidence"].dtype == np.float32 and t["ood_score"].dtype == np.float32
    assert t["index"].dtype == t["label"].dtype == t["cluster"].dtype == np.int64
    assert _listing(f"{root}/run") == ["assignments.parquet"]  # no temp file left behind

    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as f:
        assert str(pq.read_schema(f).field("split").type) == "string"


def test_assignments_defaults_and_overwrite(root):
    url = f"{root}/a.parquet"
    write_assignments(url, index=np.arange(3), clusters=np.array([2, 0, 1]), confidence=np.ones(3),
                      split="test")
    write_assignments(url, index=np.arange(4), clusters=np.array([2, 0, 1, 1]), confidence=np.ones(4),
                      split="test")
    t = read_assignments(url)
    assert set(t) == {"index", "split", "label", "cluster", "confidence"}  # no ood_score, one head
    assert t["label"].tolist() == [-1] * 4 and t["cluster"].tolist() == [2, 0, 1, 1]
    assert _listing(root) == ["a.parquet"]
    with pytest.raises(ValueError, match="confidence"):
        write_assignments(url, index=np.arange(3), clusters=np.zeros(3), confidence=np.ones(2), split="x")


def test_failed_move_leaves_no_partial_or_temp_file(monkeypatch):
    root = f"memory://djc-test-{uuid.uuid4().hex}"
    fs, _ = fsspec.core.url_to_fs(root)

    def broken_mv(*args, **kwargs):
        raise OSError("simulated failure")

    monkeypatch.setattr(type(fs), "mv", broken_mv)
    with pytest.raises(OSError, match="simulated"):
        write_json(f"{root}/metrics.json", {"acc": 1.0})
    assert not fs.exists(f"{root}/metrics.json")
    assert _listing(root) == []


def test_json_and_jsonl(root):
    write_json(f"{root}/metrics.json", {"b": np.float32(0.5), "a": float("nan"), "c": np.arange(2)})
    fs, path = fsspec.core.url_to_fs(f"{root}/metrics.json")
    text = fs.cat_file(path).decode()
    assert text.index('"a"') < text.index('"b"') and '"a": null' in text and "\n  " in text

    log = f"{root}/logs/metrics.jsonl"
    append_jsonl(log, {"step": 1, "loss": 2.0})
    append_jsonl(log, {"step": 2, "loss": np.float64(1.5)})
    assert read_jsonl(log) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    # a crash mid-append leaves a cut last line: it is dropped, not fatal
    fs, path = fsspec.core.url_to_fs(log)
    fs.pipe_file(path, fs.cat_file(path) + b'{"step": 3, "lo')
    assert [r["step"] for r in read_jsonl(log)] == [1, 2]


def _check_png(url, size):
    fs, path = fsspec.core.url_to_fs(url)
    data = fs.cat_file(path)
    assert len(data) > 0 and data[:8] == PNG_MAGIC
    with fs.open(path, "rb") as f:
        image = Image.open(f)
        image.load()
        assert image.size == size
    with fs.open(path, "rb") as f:
        assert imread(f, format="png").shape[:2] == (size[1], size[0])


def test_plots(root):
    rng = np.random.default_rng(0)
    y_true = np.repeat(np.arange(5), [200, 80, 30, 12, 5])  # long-tailed: max/min = 40 -> log y
    y_pred = np.where(rng.random(y_true.size) < 0.8, y_true, rng.integers(0, 7, y_true.size))
    y_true[:10] = -1
    w, h = (int(x * runfiles.PLOT_DPI) for x in plots.SIZES_FIGSIZE)
    plot_cluster_sizes(f"{root}/sizes.png", y_pred, y_true, 8, title="sizes")  # cluster 7 is empty
    _check_png(f"{root}/sizes.png", (w, h))
    plot_cluster_sizes(f"{root}/sizes_nolabel.png", y_pred, None, 8, class_counts=np.array([5, 5, 5]))
    _check_png(f"{root}/sizes_nolabel.png", (w, h))
    w, h = (int(x * runfiles.PLOT_DPI) for x in plots.CONFUSION_FIGSIZE)
    plot_confusion(f"{root}/confusion.png", y_true, y_pred, title="confusion")
    _check_png(f"{root}/confusion.png", (w, h))
    assert not [n for n in _listing(root) if ".tmp-" in n]


def test_plots_stay_readable_at_1000_classes(tmp_path):
    """At K = C = 1000: sizes as rank-size lines on log axes, per-class recall against class size, and no
    confusion image (1000 x 1000 cells in 600 px); the recall plot's points are the classes' recalls."""
    from djc.data.longtail import imagenet_lt_counts
    from djc.metrics import class_recall

    rng = np.random.default_rng(0)
    counts = np.array(imagenet_lt_counts())
    y = np.repeat(np.arange(1000), counts)
    c = np.where(rng.random(y.size) < 0.6, y, rng.integers(0, 1000, y.size))  # 60% right
    c[c == 7] = 8  # an empty cluster: counted in the legend, not drawn on the log axis
    table = {"index": np.arange(y.size), "split": np.full(y.size, "train", dtype=object), "label": y,
             "cluster": c}
    result = write_outputs(str(tmp_path), table, 1000, counts)
    assert result["empty_clusters"] == 1
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["cluster_sizes_train.png", "recall_train.png"]
    for name, size in (("cluster_sizes_train.png", plots.SIZES_FIGSIZE), ("recall_train.png", plots.RECALL_FIGSIZE)):
        _check_png(str(tmp_path / "plots" / name), tuple(int(v * runfiles.PLOT_DPI) for v in size))
    classes, recall = class_recall(y, c)
    assert classes.size == 1000 and recall.mean() == pytest.approx(result["balanced_acc"])


def test_evaluate_assignments_per_split_with_baseline(root):
    # train: the hand case of test_metrics (acc 5/6); test: perfect up to relabelling; baseline all in one.
    y_true = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, -1])
    y_pred = np.array([1, 1, 0, 0, 0, 2, 2, 0, 1, 1])
    split = np.array(["train"] * 6 + ["test"] * 4)
    url = f"{root}/assignments.parquet"
    write_assignments(url, index=np.arange(10), clusters=y_pred, confidence=np.ones(10), label=y_true,
                      split=split, extra={"kmeans_pixels": np.zeros(10, np.int64)})
    out = evaluate_table(read_assignments(url), num_clusters=3)
    assert set(out) == {"train", "test"}
    assert out["train"]["acc"] == pytest.approx(5 / 6)
    assert out["test"]["acc"] == pytest.approx(1.0)
    assert out["test"]["max_cluster_size"] == 2  # the unlabeled row counts for health
    assert out["test"]["baseline"]["acc"] == pytest.approx(1 / 3)
    assert out["test"]["baseline"]["empty_clusters"] == 2
    ref = evaluate(y_true[:6], y_pred[:6], 3)
    assert {k: v for k, v in out["train"].items() if k != "baseline"} == pytest.approx(ref)
    # another head through `column`
    out = evaluate_table({"label": y_true, "h": np.zeros(10, np.int64)}, 3, column="h")
    assert set(out) == {"all"} and "baseline" not in out["all"]
