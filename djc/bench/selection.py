"""`djc bench selection DIR ...`: does the label-free selection score rank finished runs as balanced ACC does?

DIR is a run dir or a directory holding run dirs at any depth (a `djc tune` search dir: its trials/*; `djc bench
quality`'s out dir). Every finished run (a checkpoint and metrics.json) is loaded as `djc predict` loads it, and
djc/selection.py's `selection_metrics` is computed in this process on the run's `eval.select_split` (the first
data.eval split when it names none), with that split's labels giving balanced ACC. Then, per method, the
Spearman rank correlation of every candidate score in selection.CANDIDATES with balanced ACC on the same split,
over the method's runs, for the selection split and for the (long-tailed) train split. A tuner needs rho near 1
among the runs it compares, and the run a score ranks first (printed beside it) is the one a search returns.
One candidate needs the other runs: consensus, each run's mean NMI with the other runs of its method on the same
split (read from their assignments.parquet), the agreement with the ensemble a search's trials form.

The measurements are kept in OUT/selection_runs.jsonl (one line per run dir), so adding a candidate that is a
formula of the logged quantities costs no new measurement (`--cached`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from djc.config import ConfigError

RUNS_FILE = "selection_runs.jsonl"


def find_runs(dirs: list[str]) -> list[Path]:
    """Run dirs (config.yaml, metrics.json and a checkpoint record) under each of `dirs`, sorted."""
    found = set()
    for d in dirs:
        root = Path(d)
        if not root.is_dir():
            raise ConfigError(f"djc bench selection: {d} is not a directory")
        for m in [root / "metrics.json", *root.rglob("metrics.json")]:
            run = m.parent
            if m.is_file() and (run / "config.yaml").is_file() and (run / "train").is_dir():
                found.add(run)
    return sorted(found)


def measure(run_dir: Path) -> list[dict[str, Any]]:
    """The selection quantities of one finished run, with balanced ACC, on its selection split and on the
    train split: digits' selection split is the balanced test split, while a user's held-out split is as
    long-tailed as the data, as the train split is. A score must rank runs on both."""
    from djc import selection
    from djc.predict import load_run

    run = load_run(str(run_dir), torch.device("cpu"))
    cfg = run.cfg
    select = cfg.eval.select_split or next(iter(cfg.data.eval), "train")
    return [{"run": str(run_dir), "method": cfg.method.name, "split": split, "role": role,
             "data": cfg.data.splits()[split],
             **selection.selection_metrics(run.method, cfg.data.splits()[split], run.views, torch.device("cpu"),
                                           cfg.method.num_clusters, cfg.data.on_corrupt)}
            for split, role in dict.fromkeys([(select, "select"), ("train", "train")])]


_TABLES: dict[str, dict] = {}  # run dir -> its assignments.parquet, read once for both distinct and consensus


def _labelings(rows: list[dict[str, Any]]) -> list[np.ndarray]:
    """Each row's clusters on its split, in sample-index order, from its run's assignments.parquet."""
    from djc.runfiles import clusters_by_index, read_assignments

    out = []
    for r in rows:
        if r["run"] not in _TABLES:
            _TABLES[r["run"]] = read_assignments(str(Path(r["run"]) / "assignments.parquet"))
        out.append(clusters_by_index(_TABLES[r["run"]], r["split"]))
    return out


def distinct(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of runs whose clusters differ from every earlier run's of the same method (on each split), and
    the runs left out: training is deterministic, so one config and seed trained twice (a benchmark and a sweep
    that both ran it) is one data point, which would count twice in a rank correlation."""
    seen: dict[tuple, str] = {}
    gone: dict[str, str] = {}  # run left out -> the earlier run with its clusters
    for run in sorted({r["run"] for r in rows}):
        mine = sorted((r for r in rows if r["run"] == run), key=lambda r: r["role"])
        key = (mine[0]["method"], *(x.tobytes() for x in _labelings(mine)))
        if key in seen:
            gone[run] = seen[key]
        else:
            seen[key] = run
    return [r for r in rows if r["run"] not in gone], [f"{run} (= {same})" for run, same in gone.items()]


def with_consensus(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with `select_consensus_nmi`: each run's mean NMI with the other runs of its method on the same
    split, from the assignments.parquet that every finished run writes (rows aligned by sample index)."""
    from djc.selection import consensus

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["role"], r.get("data", r["split"])), []).append(r)
    out = []
    for group in groups.values():
        labelings = _labelings(group)
        sizes = {len(x) for x in labelings}
        if len(sizes) > 1:
            raise ConfigError(f"djc bench selection: the {group[0]['method']} runs' {group[0]['split']} splits "
                              f"differ in size ({sorted(sizes)}); compare runs of one data set at a time")
        out += [{**r, "select_consensus_nmi": c} for r, c in zip(group, consensus(labelings))]
    return out


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    a_, b_ = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a_) & np.isfinite(b_)
    if ok.sum() < 3 or np.ptp(a_[ok]) == 0 or np.ptp(b_[ok]) == 0:
        return math.nan
    return float(spearmanr(a_[ok], b_[ok]).statistic)


def top_pick(scores: list[float], accs: list[float]) -> float:
    """The balanced ACC of the run a score ranks first (NaN scores last): what a tuner would hand back."""
    order = [i for i in range(len(scores)) if math.isfinite(scores[i])]
    return accs[max(order, key=lambda i: scores[i])] if order else math.nan


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per method, the rho of every candidate with balanced ACC, each computed on the same split:
    the selection split (digits: the balanced test split) and the long-tailed train split; and the balanced ACC
    of the run each candidate ranks first, beside the best and the median run's (a tuner returns one run)."""
    from djc.selection import CANDIDATES, SCORE

    lines = [("| method | runs | balanced ACC (select / train): range, median | candidate | rho, select split | "
              "rho, train split | its first run's balanced ACC (select / train) |"),
             "|---|---|---|---|---|---|---|"]
    for method in sorted({r["method"] for r in rows}):
        by = {role: [r for r in rows if r["method"] == method and r["role"] == role] for role in ("select", "train")}
        acc = {role: [r["select_balanced_acc"] for r in rs] for role, rs in by.items()}
        span = " / ".join(f"{min(a):.2f}-{max(a):.2f}, {float(np.median(a)):.2f}" for a in acc.values())
        for name, fn in CANDIDATES.items():
            mark = " (select_score)" if name == SCORE else ""
            rho = [spearman([fn(r) for r in by[role]], acc[role]) for role in ("select", "train")]
            pick = [top_pick([fn(r) for r in by[role]], acc[role]) for role in ("select", "train")]
            lines.append(f"| {method} | {len(by['select'])} | {span} | {name}{mark} | {rho[0]:+.3f} | {rho[1]:+.3f} | "
                         f"{pick[0]:.3f} / {pick[1]:.3f} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if not args.runs:
        raise ConfigError("djc bench selection needs --runs DIR ... (run dirs, or dirs that hold them)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _TABLES.clear()  # a run dir trained again since an earlier call in this process is read afresh
    cache = out / RUNS_FILE
    done: dict[str, list[dict[str, Any]]] = {}
    if args.cached and cache.is_file():
        for r in map(json.loads, cache.read_text().splitlines()):
            done.setdefault(r["run"], []).append(r)
    runs = find_runs(args.runs)
    t0 = time.time()
    rows = []
    for i, run in enumerate(runs):
        if str(run) not in done:
            done[str(run)] = measure(run)
            accs = ", ".join(f"{r['split']} {r['select_balanced_acc']:.3f}" for r in done[str(run)])
            print(f"[djc bench] {i + 1}/{len(runs)} {run}: balanced ACC {accs}", flush=True)
        rows += done[str(run)]
    cache.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for rs in done.values() for r in rs))
    rows, dropped = distinct(rows)
    for d in dropped:
        print(f"[djc bench] left out, the same clusters as an earlier run: {d}")
    text = table(with_consensus(rows))
    print(f"\nSpearman rho of each label-free score with balanced ACC over {len(runs) - len(dropped)} distinct "
          f"finished runs ({time.time() - t0:.0f} s)\n{text}")
    (out / "selection.md").write_text(text + "\n")
    return 0
