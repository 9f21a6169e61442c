"""`djc bench quality`: every method's run config, on every data set, over several seeds, against the k-means
baselines of the same runs.

One command produces the quality table of docs/results.md: mean and std over training seeds of the metrics on each
evaluated split, per (data set, method), with the k-means on pixels and on learned features baselines that the
same runs report. A data set is a named set of overrides applied to every config (by default the configs' own
long-tailed digits and the balanced digits train split), so every method sees exactly the same data.
All runs share one Ray session (each fit still costs Ray's start-up of a worker group, ~15 s).

With --pretext CONFIG it runs the two-stage recipe beside each method: per data set and seed, the pretext run
first (a contrastive job with no clustering term, e.g. jobs/digits_lt_pretext.yaml), then every config again on
its frozen encoder (model.weights=<pretext run dir>, model.freeze=all, augment.policy=none: features computed once)
as "<method> (pretext)", with k-means on the same pretext features ("kmeans-encoder") as the bar it must reach;
pairs.md holds each pair's difference from that bar, seed by seed (a pair and its bar share the pretext run).
Every row carries its wall time in minutes (a pretext pair: pretext + clustering run), so a from-scratch run can
be compared with the pair for the same total time. --pretext-head: the configs cluster on the pretext's projection
outputs (model.weights_head). --pair-views augmented: the configs keep their own views, so the frozen encoder runs
on augmented images every step (P2OT's release recipe) instead of once. --pair-neighbors N (cached views only): a
pair's second view is one of each sample's N nearest neighbours in the pretext's features (augment.neighbors),
set on the pairs alone, since a from-scratch or pretext run refuses it. --stages: only the from-scratch runs or
only the pairs. --reuse: a run that finished in its run dir from the same config (bench.json: the config's digest
and the wall time) is read, not rerun.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

from djc import runfiles
from djc.config import Config, ConfigError, load_config
from djc.methods import REGISTRY

KEYS = ("balanced_acc", "acc", "nmi", "tail_acc", "size_entropy")
TIME = "minutes"  # the wall time column: one run's (a pretext pair: both runs')
PAIRS_FILE = "pairs.md"  # beside quality.md with --pretext: each pair minus k-means on its pretext, seed by seed
BENCH_FILE = "bench.json"  # beside a run's metrics.json: the digest of its config and its wall time (--reuse)
# Every registered method's job (djc/methods/__init__.py); each trains on the same long-tailed train split.
DEFAULT_CONFIGS = [e.job for e in REGISTRY.values() if e.job]
# name:overrides. lt10 = the configs' own data (ratio 10, 562 images); balanced = all 1,438 train images.
DEFAULT_DATA = ["lt10:", "balanced:data.train=runs/data/digits/train,data.imbalance_ratio=1"]


def parse_named(specs: list[str]) -> dict[str, list[str]]:
    """'name:key=v,key=v' -> {name: [key=v, ...]}."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, rest = spec.partition(":")
        if not sep or not name:
            raise ConfigError(f"--data '{spec}' is not of the form NAME:key=v,key=v")
        out[name] = [kv for kv in rest.split(",") if kv]
    return out


def row_labels(configs: list[str]) -> dict[str, str]:
    """A row's name per config: "" (the method's name) unless two configs run the same method, as a contrastive
    reference (DCL with lam=0) beside DCL does; those rows take the config file's stem."""
    methods = {c: load_config(c).method.name for c in configs}
    shared = {m for m in methods.values() if list(methods.values()).count(m) > 1}
    return {c: Path(c).stem if m in shared else "" for c, m in methods.items()}


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def format_rows(rows: dict[tuple[str, str, str], dict[str, list[float]]], keys=(*KEYS, TIME)) -> str:
    """Markdown table, sorted by data set, split, then method; each cell mean ± std over seeds."""
    lines = ["| data | split | method | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 3)]
    for (data, split, method), r in sorted(rows.items()):
        lines.append(f"| {data} | {split} | {method} | " + " | ".join(_fmt(r.get(k, [])) for k in keys) + " |")
    return "\n".join(lines)


def format_against_encoder(rows: dict[tuple[str, str, str], dict[str, list[float]]], key: str = KEYS[0]) -> str:
    """Each pair's seed-by-seed difference from k-means on the same pretext's features (the bar a pair must reach),
    as a Markdown table: mean ± std of the differences, each seed's, and on how many seeds the pair is at or above.
    The two lists are aligned by seed: a pair and its k-means row are appended once per seed, in seed order."""
    lines = []
    for (data, split, method), r in sorted(rows.items()):
        bar = rows.get((data, split, "kmeans-encoder (pretext)"), {}).get(key)
        if not method.endswith(" (pretext)") or method.startswith("kmeans-") or not bar:
            continue
        diffs = [a - b for a, b in zip(r[key], bar)]
        seeds = ", ".join(f"{d:+.3f}" for d in diffs)
        at_or_above = sum(d >= 0 for d in diffs)
        sign = "+" if statistics.mean(diffs) >= 0 else ""
        lines.append(f"| {data} | {split} | {method} | {sign}{_fmt(diffs)} | {seeds} | {at_or_above} of {len(diffs)} |")
    if not lines:
        return ""
    return "\n".join([f"| data | split | pair | {key} minus kmeans-encoder (pretext) | per seed | seeds at or above |",
                      "|---|---|---|---|---|---|", *lines])


def main(args: argparse.Namespace) -> int:
    from djc import launch, rundir, storage

    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds}: a quality benchmark needs at least one seed")
    configs = args.config or DEFAULT_CONFIGS
    datasets = parse_named(args.data or DEFAULT_DATA)
    rows: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    pretext = getattr(args, "pretext", None)
    # (config, data, seed, stage): stage "" = from scratch, "pretext" = the pretext run, "on-pretext" = the config
    # on the pretext run's frozen encoder (after the pretext run of the same data set and seed).
    stages = set(_list(getattr(args, "stages", "scratch,pairs")))
    if not stages or stages - {"scratch", "pairs"}:
        raise ConfigError(f"--stages {getattr(args, 'stages', '')!r}: a comma list of scratch and pairs")
    if stages == {"pairs"} and not pretext:
        raise ConfigError("--stages pairs needs --pretext CONFIG")
    head = ["model.weights_head=true"] if getattr(args, "pretext_head", False) else []
    views = getattr(args, "pair_views", "cached")
    if views not in ("cached", "augmented"):
        raise ConfigError(f"--pair-views {views!r}: cached or augmented")
    neighbors = getattr(args, "pair_neighbors", 0)
    if neighbors < 0 or (neighbors and views != "cached"):
        raise ConfigError(f"--pair-neighbors {neighbors}: a count >= 0, with --pair-views cached (neighbours are "
                          f"mined in features computed once)")
    runs = []
    for d in datasets:
        for s in range(args.seeds):
            if "scratch" in stages:
                runs += [(c, d, s, "") for c in configs]
            if pretext and "pairs" in stages:
                runs += [(pretext, d, s, "pretext"), *[(c, d, s, "on-pretext") for c in configs]]
    # Every run's config built and validated before the first trains: a bad value in the last job of a long bench
    # is an error in seconds, not after an hour of the runs before it. (Its data and weights are checked when it
    # starts: a pair's weights are the pretext run before it.)
    plan = [(config, data, seed, stage, *_run_config(args, config, data, seed, stage, datasets, pretext, head, views,
                                                     neighbors)) for config, data, seed, stage in runs]
    # So is a run dir that holds a checkpoint of another config (a job edited since the last bench into the same
    # --out), which the run would refuse when its turn came: named now, before any run trains.
    reuse = getattr(args, "reuse", False)
    reused = [_done(run_dir, cfg) if reuse else None for *_, cfg, run_dir in plan]
    for (*_, cfg, run_dir), done in zip(plan, reused):
        if done is None:
            storage.configure(cfg.storage)
            try:
                rundir.check_unchanged(cfg, run_dir)
            except rundir.RunDirError as err:
                raise rundir.RunDirError(f"{err} (djc bench: its job changed since that run; move the run dir aside "
                                         f"or bench into another --out. Nothing ran)") from None
    t_start = time.time()
    labels = row_labels(configs)
    pretext_minutes: dict[tuple[str, int], float] = {}
    for i, ((config, data, seed, stage, cfg, run_dir), done) in enumerate(zip(plan, reused)):
        launch.ensure_datasets(cfg)
        launch.check_against_data(cfg)
        eta = "" if i == 0 else f", ~{(time.time() - t_start) / i * (len(runs) - i) / 60:.0f} min left"
        print(f"[djc bench] run {i + 1}/{len(runs)}: {cfg.method.name}{' ' + stage if stage else ''} on {data}, "
              f"seed {seed} -> {run_dir}{eta}", flush=True)
        if done is not None:  # --reuse: the same config ran to the end in this run dir before
            result, minutes = done
            print(f"[djc bench]   reused ({minutes:.1f} min when it ran)", flush=True)
        else:
            t_run = time.time()
            result = launch.run(cfg, run_dir, echo_config=False)
            minutes = (time.time() - t_run) / 60
            runfiles.write_json(f"{run_dir}/{BENCH_FILE}", {"config": _digest(cfg), "minutes": minutes})
        if stage == "pretext":
            pretext_minutes[data, seed] = minutes
            continue
        name = (labels[config] or cfg.method.name) + (" (pretext)" if stage else "")
        if stage:
            minutes += pretext_minutes[data, seed]
        for split, m in result["splits"].items():
            entries = {name: m, f"kmeans-features ({name})": m.get("baseline_features"),
                       f"knn-merge ({name})": m.get("baseline_knn_merge")}
            if stage and config == configs[0]:  # k-means on the pretext encoder's own features: one per seed
                entries["kmeans-encoder (pretext)"] = m.get("baseline_encoder")
            if not stage and config == configs[0]:  # pixels do not depend on the method: one row per data set, seed
                entries["kmeans-pixels"] = m.get("baseline")
                entries["knn-merge-pixels"] = m.get("baseline_knn_merge_pixels")
            for method, vals in entries.items():
                if vals is None:
                    continue
                r = rows.setdefault((data, split, method), {})
                for k in KEYS:
                    r.setdefault(k, []).append(float(vals[k]))
                if method == name:
                    r.setdefault(TIME, []).append(minutes)
    table = format_rows(rows)
    print(f"\nquality over {args.seeds} seeds (mean ± std), {len(runs)} runs in "
          f"{(time.time() - t_start) / 60:.1f} min\n{table}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.md").write_text(table + "\n")
    if against := format_against_encoder(rows):
        print(f"\nthe pairs against k-means on the same pretext's features, seed by seed\n{against}")
        (out / PAIRS_FILE).write_text(against + "\n")
    return 0


def _list(arg: str) -> list[str]:
    return [a for a in arg.split(",") if a]


def _changed(value: Any, default: Any) -> Any:
    """The parts of a config dump that differ from the defaults' (a key added to djc later, at its default, is not
    a change: a run from before it is still the same run)."""
    if isinstance(value, dict) and isinstance(default, dict):
        out = {k: _changed(v, default.get(k)) for k, v in value.items() if k not in default or v != default[k]}
        return {k: v for k, v in out.items() if v != {}}
    return value


def _digest(cfg) -> str:
    changed = _changed(cfg.model_dump(mode="json"), Config().model_dump(mode="json"))
    return hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()


def _done(run_dir: str, cfg) -> tuple[dict, float] | None:
    """(metrics.json, minutes) of a run of this very config that finished in run_dir; None otherwise."""
    try:
        info = runfiles.read_json(f"{run_dir}/{BENCH_FILE}")
        if info.get("config") != _digest(cfg):
            return None
        return runfiles.read_json(f"{run_dir}/metrics.json"), float(info["minutes"])
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return None


def _run_config(args, config: str, data: str, seed: int, stage: str, datasets: dict, pretext: str | None,
                head: list[str], views: str, neighbors: int) -> tuple[Config, str]:
    """One bench run's resolved config and run dir; stage "on-pretext" puts the config on the frozen encoder of
    the pretext run of the same data set and seed."""
    from djc import launch

    extra, tag = [], ""
    if stage == "on-pretext":
        pcfg = load_config(pretext, [*args.overrides, *datasets[data]])
        extra = [f"model.weights={_pretext_dir(args.out, data, pretext, seed)}", "model.freeze=all",
                 f"model.backbone={pcfg.model.backbone}", f"model.width={pcfg.model.width}", *head]
        if views == "cached":  # no augmentation on the frozen encoder's input: its features computed once
            extra.append("augment.policy=none")
        if neighbors:
            extra.append(f"augment.neighbors={neighbors}")
        tag = (("-on-pretext-head" if head else "-on-pretext") + ("-aug" if views == "augmented" else "")
               + (f"-nn{neighbors}" if neighbors else ""))
    cfg = launch.resolve(load_config(config, [*args.overrides, *datasets[data], f"seed={seed}", *extra]))
    run_dir = (_pretext_dir(args.out, data, config, seed) if stage == "pretext"
               else launch.absolute(f"{args.out}/{data}/{Path(config).stem}{tag}-seed{seed}"))
    return cfg, run_dir


def _pretext_dir(out: str, data: str, pretext: str, seed: int) -> str:
    from djc import launch

    return launch.absolute(f"{out}/{data}/{Path(pretext).stem}-seed{seed}")
