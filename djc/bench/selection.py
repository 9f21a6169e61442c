"""`djc bench selection DIR ...`: does the label-free selection score rank finished runs as balanced ACC does?

DIR is a run dir or a directory holding run dirs at any depth (a `djc tune` search dir: its trials/*; `djc bench
quality`'s out dir). Every finished run (a checkpoint and metrics.json) is loaded as `djc predict` loads it, and
djc/selection.py's `selection_metrics` is computed in this process on the run's `eval.select_split` (the first
data.eval split when it names none), with that split's labels giving balanced ACC. Then, per method, the
Spearman rank correlation of every candidate score in selection.CANDIDATES with balanced ACC on the same split,
over the method's runs, for the selection split and for the (long-tailed) train split. A tuner needs rho near 1 among the runs it compares.

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
             **selection.selection_metrics(run.method, cfg.data.splits()[split], run.views, torch.device("cpu"),
                                           cfg.method.num_clusters, cfg.data.on_corrupt)}
            for split, role in dict.fromkeys([(select, "select"), ("train", "train")])]


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    a_, b_ = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a_) & np.isfinite(b_)
    if ok.sum() < 3 or np.ptp(a_[ok]) == 0 or np.ptp(b_[ok]) == 0:
        return math.nan
    return float(spearmanr(a_[ok], b_[ok]).statistic)


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per method, the rho of every candidate with balanced ACC, each computed on the same split:
    the selection split (digits: the balanced test split) and the long-tailed train split."""
    from djc.selection import CANDIDATES, SCORE

    lines = ["| method | runs | balanced ACC (select / train) | candidate | rho, select split | rho, train split |",
             "|---|---|---|---|---|---|"]
    for method in sorted({r["method"] for r in rows}):
        by = {role: [r for r in rows if r["method"] == method and r["role"] == role] for role in ("select", "train")}
        acc = {role: [r["select_balanced_acc"] for r in rs] for role, rs in by.items()}
        span = " / ".join(f"{min(a):.2f}-{max(a):.2f}" for a in acc.values())
        for name, fn in CANDIDATES.items():
            mark = " (select_score)" if name == SCORE else ""
            rho = [spearman([fn(r) for r in by[role]], acc[role]) for role in ("select", "train")]
            lines.append(f"| {method} | {len(by['select'])} | {span} | {name}{mark} | {rho[0]:+.3f} | {rho[1]:+.3f} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if not args.runs:
        raise ConfigError("djc bench selection needs --runs DIR ... (run dirs, or dirs that hold them)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
    text = table(rows)
    print(f"\nSpearman rho of each label-free score with balanced ACC over {len(runs)} finished runs "
          f"({time.time() - t0:.0f} s)\n{text}")
    (out / "selection.md").write_text(text + "\n")
    return 0
