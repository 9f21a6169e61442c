"""`djc bench quality`: every run config over several seeds, against the k-means baselines of the same runs.

One command produces the README's quality table: mean and std over seeds of the metrics on each evaluated
split, for each config and variant, with the k-means on pixels / on learned features baselines of those runs.
All runs share one Ray session (each fit still costs Ray's start-up of a worker group).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from djc.config import load_config

KEYS = ("balanced_acc", "acc", "nmi", "tail_acc")


def _variants(specs: list[str]) -> dict[str, list[str]]:
    """'name:key=v,key=v' -> {name: [key=v, ...]}; no spec -> the config as it is."""
    out: dict[str, list[str]] = {}
    for spec in specs or ["default:"]:
        name, _, rest = spec.partition(":")
        out[name] = [kv for kv in rest.split(",") if kv]
    return out


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main(args: argparse.Namespace) -> int:
    from djc import train
    from djc.cli import _absolute, check_against_data, ensure_datasets, resolve

    rows: dict[str, dict[str, list[float]]] = {}
    for config in args.config:
        for vi, (vname, vover) in enumerate(_variants(args.variant).items()):
            for seed in range(args.seeds):
                cfg = resolve(load_config(config, [*args.overrides, *vover, f"seed={seed}"]))
                ensure_datasets(cfg)
                check_against_data(cfg)
                label = f"{Path(config).stem}" + ("" if vname == "default" else f" [{vname}]")
                run_dir = _absolute(f"{args.out}/{Path(config).stem}-{vname}-seed{seed}")
                print(f"[djc bench] {label} seed {seed} -> {run_dir}", flush=True)
                result = train.fit(cfg, run_dir)
                for split, m in result["splits"].items():
                    entries = {f"{cfg.method.name} {label}": m, f"kmeans-features ({label})": m.get("baseline_features")}
                    if vi == 0:  # the pixel baseline does not depend on the variant
                        entries[f"kmeans-pixels ({Path(config).stem})"] = m.get("baseline")
                    for row, vals in entries.items():
                        if vals is None:
                            continue
                        r = rows.setdefault(f"{split} | {row}", {})
                        for k in KEYS:
                            r.setdefault(k, []).append(float(vals[k]))
    header = "| split | method | " + " | ".join(KEYS) + " |"
    lines = [header, "|" + "---|" * (len(KEYS) + 2)]
    for name, r in sorted(rows.items()):
        split, method = name.split(" | ")
        lines.append(f"| {split} | {method} | " + " | ".join(_fmt(r[k]) for k in KEYS) + " |")
    table = "\n".join(lines)
    print(f"\nquality over {args.seeds} seeds (mean ± std)\n{table}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.md").write_text(table + "\n")
    return 0
