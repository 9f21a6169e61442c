"""djc tune: search spaces checked against the config before any trial, and a tiny real search end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray import tune as rt

from djc import cli
from djc.config import ConfigError, from_dict, load_config, load_tree
from tune import spaces
from tune.search import check_space, job_values

ROOT = Path(__file__).resolve().parents[1]
JOB = str(ROOT / "jobs" / "digits_lt.yaml")
JOBS = {"secu": "digits_lt.yaml", "dcl": "digits_lt_dcl.yaml", "statdec": "digits_lt_statdec.yaml",
        "aecm": "digits_lt_aecm.yaml", "p2ot": "digits_lt_p2ot.yaml"}


def bad_space(cfg):
    return {"method.secu.t_x": rt.loguniform(0.02, 0.2), "method.secu.gama": rt.uniform(0.1, 0.9)}


@pytest.mark.parametrize("method", sorted(JOBS))
def test_every_method_space_fits_its_job_config(method):
    tree = load_tree(ROOT / "jobs" / JOBS[method])
    cfg = from_dict(tree)
    space = spaces.load(method)(cfg)
    assert space and all(k.startswith(f"method.{method}.") for k in space)
    check_space(method, space, tree, cfg)  # both ends of every range make a valid config


@pytest.mark.parametrize("method", sorted(JOBS))
def test_every_methods_space_contains_its_jobs_own_values(method):
    """The job's values are every search's first trial, so each space must contain them."""
    tree = load_tree(ROOT / "jobs" / JOBS[method])
    space = spaces.load(method)(from_dict(tree))
    first = job_values(space, tree)
    assert first is not None and set(first) == set(space)
    cfg = from_dict(tree)
    for key, value in first.items():
        section = getattr(cfg.method, method)
        assert getattr(section, key.rsplit(".", 1)[1]) == value


def test_a_space_that_leaves_the_job_out_is_noticed():
    tree = load_tree(JOB)
    assert job_values({"method.secu.tau": rt.uniform(0.3, 0.5)}, tree) is None  # the job's tau is 0.2
    assert job_values({"method.secu.tau": rt.uniform(0.1, 0.5)}, tree) == {"method.secu.tau": 0.2}


@pytest.mark.parametrize("space, message", [
    ({"method.secu.gama": rt.uniform(0.1, 0.9)}, "unknown config key 'method.secu.gama' (did you mean "
                                                  "'method.secu.gamma'?)"),
    ({"method.secu.t_x": rt.uniform(-0.1, 0.1)}, "key 'method.secu.t_x' = -0.1"),
    ({"method.dcl.temperature": rt.uniform(0.1, 1.0)}, "trains method.name=secu: use --space secu"),
    ({}, "is empty"),
])
def test_a_bad_space_is_refused_naming_the_key(space, message):
    tree = load_tree(JOB)
    with pytest.raises(ConfigError) as err:
        check_space("mine", space, tree, from_dict(tree))
    assert message in str(err.value)


def test_djc_tune_with_an_unknown_key_fails_before_any_trial(tmp_path, capsys):
    out = tmp_path / "search"
    code = cli.main(["tune", JOB, "--space", "tests.test_tune:bad_space", "--samples", "2", "--out", str(out)])
    assert code == 2
    assert "unknown config key 'method.secu.gama'" in capsys.readouterr().err
    assert not out.exists()  # no trial started, nothing written
    assert cli.main(["tune", JOB, "--space", "nope", "--samples", "2"]) == 2
    assert "unknown search space" in capsys.readouterr().err


@pytest.mark.slow
def test_a_tiny_search_prints_its_trials_and_writes_a_best_yaml_djc_train_accepts(tmp_path):
    out = tmp_path / "search"
    small = [f"data.train={tmp_path}/data/train", f"data.eval={{test: {tmp_path}/data/test}}", "optim.epochs=2",
             "model.width=8", "method.secu.num_heads=2", "optim.warmup_epochs=1", "method.kmeans.restarts=1",
             "eval.baseline=false", "trainer.cpus_per_worker=0.45"]  # 2 x (2 x 0.45 + 0.01) CPUs: 2 trials at once
    # Two samples, so both trials run at once (a third waited for a slot: +40 s of CI): the job's values and one of
    # Optuna's, which is all the assertions below need.
    # Its own process, so its own local Ray instance (djc tune starts one with the dashboard it needs).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "djc.cli", "tune", JOB, "--space", "secu", "--samples", "2",
                           "--search", "optuna", "--out", str(out), *small], env=env, capture_output=True, text=True,
                          timeout=500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    table = (out / "trials.txt").read_text().splitlines()
    assert table[0].split()[:4] == ["trial", "status", "epochs", "select_score"]
    assert table[0] in done.stdout
    rows = [line.split() for line in table[2:] if not line.endswith("the job's own values")]
    assert len(rows) == 2 and rows[0][1] == "completed" and rows[0][2] == "2"
    # The first trial is the job's own values (t_x = t_w = 0.05, tau 0.2, alpha 100), the other Optuna's.
    first = table[-1].split()[0]
    assert table[-1] == f"{first} is the job's own values" and first in (r[0] for r in rows)
    job = yaml.safe_load((out / "trials" / first / "config.yaml").read_text())["method"]["secu"]
    assert (job["t_x"], job["t_w"], job["tau"], job["alpha"]) == (0.05, 0.05, 0.2, 100)
    others = [yaml.safe_load((out / "trials" / r[0] / "config.yaml").read_text())["method"]["secu"]["alpha"]
              for r in rows if r[0] != first]
    assert len(others) == 1 and others[0] != 100  # Optuna's trial is not a second copy of the job's

    best = load_config(out / "best.yaml")  # what `djc train best.yaml` loads
    trial = yaml.safe_load((out / "trials" / rows[0][0] / "config.yaml").read_text())
    for key in ("t_x", "t_w", "tau", "alpha"):
        assert getattr(best.method.secu, key) == trial["method"]["secu"][key]
    assert best.name == "digits_lt_tuned" and best.eval.select_split == "test"
    assert best.optim.epochs == 2 and best.model.width == 8  # the base config's own overrides are kept
    for name in (r[0] for r in rows):
        lines = (out / "trials" / name / "metrics.jsonl").read_text().splitlines()
        assert lines and all("select_score" in ln for ln in lines)
    # A completed trial is a whole run dir: ASHA lets it reach its final evaluation.
    assert (out / "trials" / rows[0][0] / "metrics.json").is_file()
    assert (out / "trials" / rows[0][0] / "assignments.parquet").is_file()


def test_pick_consensus_takes_the_trial_the_others_agree_with(tmp_path, capsys):
    """--pick consensus: best.yaml takes the completed trial whose clusters on the select split agree most (mean
    NMI) with the other completed trials', read from their assignments.parquet (rows shuffled: aligned by index),
    however the metric ranked them; with fewer than 3 completed trials it keeps the metric's pick."""
    import numpy as np

    from djc.runfiles import write_assignments
    from tune.search import choose

    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(5), 40)  # 200 samples of the select split
    noisy = lambda p: np.where(rng.random(200) < p, rng.integers(0, 5, 200), truth)  # noqa: E731
    trials = {"a": rng.integers(0, 5, 200), "b": noisy(0.1), "c": noisy(0.3), "d": noisy(0.5)}
    for name, clusters in trials.items():
        order = rng.permutation(200)
        train = rng.integers(0, 5, 50)  # another split's rows, which must not count
        write_assignments(f"{tmp_path}/trials/{name}/assignments.parquet",
                          index=np.r_[order, np.arange(50)], clusters=np.r_[clusters[order], train],
                          confidence=np.ones(250), split=np.array(["test"] * 200 + ["train"] * 50, dtype=object))
    # ranked by select_score: the random trial first
    done = [{"trial": t, "select_score": s} for t, s in zip("adcb", (0.9, 0.8, 0.7, 0.6))]
    same, key = choose(done, "score", "select_score", str(tmp_path), "test")
    assert same == done and key == "select_score"
    picked, key = choose(done, "consensus", "select_score", str(tmp_path), "test")
    assert key == "consensus" and [r["trial"] for r in picked] == ["b", "c", "d", "a"]
    assert picked[0]["consensus"] > picked[-1]["consensus"] and picked[0]["select_score"] == 0.6
    assert (tmp_path / "consensus.txt").read_text().splitlines()[0].startswith("b  consensus ")
    few, key = choose(done[:2], "consensus", "select_score", str(tmp_path), "test")
    assert key == "select_score" and few == done[:2] and "needs 3 completed trials" in capsys.readouterr().out
