"""The trials of a `djc tune` search dir at one epoch: select_score (what the search ranked by) beside the
selection split's balanced ACC (labels read only for this check), and their Spearman rank correlation.

    python benchmarks/tune_trials.py runs/tune/digits_lt [--epoch 6]

Each trial's metrics.jsonl holds both every epoch; --epoch (default: the first ASHA rung that every trial
reached, i.e. the smallest last epoch) compares trials at the same point of training.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scipy.stats import spearmanr


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("search_dir")
    p.add_argument("--epoch", type=int, default=None)
    args = p.parse_args()
    runs = {}
    for t in sorted((Path(args.search_dir) / "trials").iterdir()):
        f = t / "metrics.jsonl"
        lines = [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []
        if lines:
            runs[t.name] = {m["epoch"]: m for m in lines}
    epoch = args.epoch or min(max(by) for by in runs.values())
    rows = sorted(((by[epoch]["select_score"], by[epoch]["select_balanced_acc"], name, max(by))
                   for name, by in runs.items() if epoch in by), reverse=True)
    print(f"{len(rows)} trials at epoch {epoch}:")
    for score, acc, name, last in rows:
        print(f"  {name}  select_score {score:.4f}  balanced_acc {acc:.4f}  (ran {last} epochs)")
    rho = spearmanr([r[0] for r in rows], [r[1] for r in rows]).statistic
    print(f"Spearman rho of select_score with balanced ACC: {rho:+.3f}")


if __name__ == "__main__":
    main()
