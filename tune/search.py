"""`djc tune CONFIG --space NAME --samples N`: a Ray Tune search in which every trial is a djc Train run.

The pattern Ray 2.60's Train V2 asks for: a Tune function per trial (`train_trial`, reserving 0.01 CPU; Tune
refuses 0) builds and fits the run's TorchTrainer through djc.launch.fit with Tune's report callback; the training loop reports its per-epoch metrics, reduced over workers, from every rank. ASHA (default)
compares trials at epochs E/10, 3E/10, 9E/10 and stops those in the worse two thirds at each rung.

Trials are ranked by a metric of the run config's `eval.select_split` (djc/selection.py): the label-free
`select_score` by default, or ACC / balanced ACC when that split is labelled and `--metric` asks for it; ASHA
stops trials by it. The best trial that ran all its epochs is written as best.yaml: the run config plus its
values, which `djc train` takes as is. `--pick consensus` picks it instead by each completed trial's mean NMI with
the other completed trials on the select split (djc/selection.py `consensus`, read from their assignments):
the clustering the search's runs agree on, which ranked digits-LT runs closer to balanced ACC than select_score
did (docs/cluster.md). Each trial's run dir is `OUT/trials/<trial name>`, a full djc run dir (config, metrics log,
checkpoints, assignments, metrics.json).
"""

from __future__ import annotations

import argparse
import functools
import math
from pathlib import PurePosixPath
from typing import Any

import yaml

from djc.config import Config, ConfigError, from_dict, load_tree, to_dict, to_yaml, with_values
from djc.methods import REGISTRY
from djc.selection import METRICS
from tune import spaces

TRIAL_CPU = 0.01  # the trial's driver only waits on its TorchTrainer; the workers reserve the real CPUs


def train_trial(values: dict[str, Any], base: dict[str, Any], root: str) -> None:
    """One trial, in a Tune actor: the base config with the sampled values, trained in a trial-named run dir."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from djc import launch
    from djc.runfiles import write_text

    cfg = from_dict(with_values(base, values))
    run_dir = f"{root}/trials/{ray.tune.get_context().get_trial_name()}"
    write_text(f"{run_dir}/config.yaml", to_yaml(cfg))
    launch.fit(cfg, run_dir, callbacks=[TuneReportCallback()])


# ---------------------------------------------------------------------------------------------------------
# Checks before any trial starts.


def _probe_values(domain: Any) -> list[Any]:
    """Values that stand for a domain's whole range: its ends (floats: just below the open upper end)."""
    from ray.tune.search.sample import Categorical, Domain, Float, Integer

    if isinstance(domain, Categorical):
        return list(domain.categories)
    if isinstance(domain, Float):
        return [domain.lower, math.nextafter(domain.upper, domain.lower)]
    if isinstance(domain, Integer):
        return [domain.lower, domain.upper - 1]
    if isinstance(domain, Domain):
        return [domain.sample() for _ in range(3)]
    if isinstance(domain, dict) and "grid_search" in domain:
        return list(domain["grid_search"])
    return [domain]


def check_space(name: str, space: dict[str, Any], tree: dict[str, Any], cfg: Config) -> None:
    """Every key a config key of the run's method, every value a valid config: refused with the key named."""
    if not space:
        raise ConfigError(f"search space {name!r} is empty")
    for key, domain in space.items():
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "method" and parts[1] in REGISTRY and parts[1] != cfg.method.name:
            raise ConfigError(f"search space {name!r} tunes {key!r}, but the run config trains "
                              f"method.name={cfg.method.name}: use --space {cfg.method.name}")
        for value in _probe_values(domain):
            try:
                from_dict(with_values(tree, {key: value}))
            except ConfigError as err:
                raise ConfigError(f"search space {name!r}, key {key!r} = {value!r}: {err}") from None


def _check_metric(cfg: Config, metric: str) -> None:
    from djc.data.shards import read_manifest

    if metric == "score":
        return
    url = cfg.data.splits()[cfg.eval.select_split]
    if sum(read_manifest(url).class_counts) == 0:
        raise ConfigError(f"--metric {metric} needs labels, but eval.select_split={cfg.eval.select_split} "
                          f"({url}) has none; use --metric score (label-free)")


# ---------------------------------------------------------------------------------------------------------
# The search.


def concurrent_trials(cfg: Config) -> int:
    """How many trials the cluster holds at once (at its largest, with an autoscaler): each is a driver of
    TRIAL_CPU plus its workers."""
    from djc.ray_setup import cluster_capacity

    t, total = cfg.trainer, cluster_capacity()
    n = int(total.get("CPU", 0.0) / (t.num_workers * t.cpus_per_worker + TRIAL_CPU) + 1e-9)
    if t.use_gpu:
        n = min(n, int(total.get("GPU", 0.0) / t.num_workers + 1e-9))
    return max(1, n)


def _trial_name(prefix: str, trial) -> str:
    return f"{prefix}_{trial.trial_id}"


def job_values(space: dict[str, Any], tree: dict[str, Any]) -> dict[str, Any] | None:
    """The run config's own value of every key of the space (defaults where the YAML leaves a key out): the
    first trial, so a search starts from the hand-tuned job and can only improve on it. None if one of them lies
    outside its domain (a search space that does not contain the job)."""
    from ray.tune.search.sample import Categorical, Float, Integer

    flat = to_dict(from_dict(tree))
    values = {}
    for key, domain in space.items():
        node: Any = flat
        for part in key.split("."):
            node = node[part]
        inside = (node in domain.categories if isinstance(domain, Categorical) else
                  domain.lower <= node <= domain.upper if isinstance(domain, (Float, Integer)) else True)
        if not inside:
            return None
        values[key] = node
    return values


def searcher(name: str, key: str, first: dict[str, Any] | None, samples: int, concurrent: int, seed: int):
    """--search: random sampling, or Optuna's TPE / HyperOpt's TPE through Ray Tune's own integrations. TPE
    starts from a few random points (a quarter of the trials, at least 3) and then samples where the trials that
    scored best so far lie; the job's values are the first point of every search."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    points = [first] if first else []
    startup = max(3, samples // 4)
    if name == "random":
        return BasicVariantGenerator(random_state=seed, max_concurrent=concurrent, points_to_evaluate=points)
    if name == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial otherwise
        alg = OptunaSearch(metric=key, mode="max", points_to_evaluate=points,
                           sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup))
    else:
        from ray.tune.search.hyperopt import HyperOptSearch

        alg = HyperOptSearch(metric=key, mode="max", points_to_evaluate=points, n_initial_points=startup,
                             random_state_seed=seed)
    return ConcurrencyLimiter(alg, max_concurrent=concurrent)


def run(cfg: Config, space: dict[str, Any], samples: int, out: str, metric: str, scheduler: str,
        search: str = "optuna", first: dict[str, Any] | None = None):
    """Tuner.fit over `space`, `first` (the job's values) as its first trial; returns Ray's ResultGrid. Ray must
    be up (djc.ray_setup.ensure_ray)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    key = METRICS[metric]
    epochs = cfg.optim.epochs
    # Rungs at epochs/10 x 1, 3, 9, ..: 6, 18, 54 of 60; a trial in the lower two thirds at a rung stops.
    # stop_last_trials=False: ASHA would otherwise stop a trial on its epochs-th report, before the workers'
    # final evaluation, and a completed trial's run dir would lack assignments.parquet and metrics.json.
    sched = (ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=max(1, epochs // 10), reduction_factor=3,
                           stop_last_trials=False)
             if scheduler == "asha" else FIFOScheduler())
    # Trials beyond what the cluster holds at once would start their drivers and wait on placement groups:
    # on 2 CPUs, 2 workers x 0.5 CPU + 0.01 for the driver = 1.01 fit once.
    concurrent = concurrent_trials(cfg)
    name = functools.partial(_trial_name, cfg.name)
    trainable = tune.with_parameters(train_trial, base=to_dict(cfg), root=out)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": TRIAL_CPU}),
        param_space=space,
        tune_config=tune.TuneConfig(metric=key, mode="max", num_samples=samples, scheduler=sched,
                                    search_alg=searcher(search, key, first, samples, concurrent, cfg.seed),
                                    trial_name_creator=name, trial_dirname_creator=name),
        run_config=tune.RunConfig(name="tune", storage_path=out, verbose=1),
    )
    return tuner.fit()


def trial_rows(grid, key: str, epochs: int) -> list[dict[str, Any]]:
    """One row per trial, best first: name, status, epochs run, the metric and the sampled values."""
    rows = []
    for r in grid:
        m = r.metrics or {}
        ran = int(m.get("epoch", 0))
        status = ("error" if r.error else "completed" if ran == epochs else "stopped")
        value = m.get(key)
        rows.append({"trial": PurePosixPath(str(r.path)).name, "status": status, "epochs": ran,
                     key: float(value) if value is not None else math.nan, "values": dict(r.config),
                     "error": str(r.error).strip().splitlines()[-1] if r.error else ""})
    rows.sort(key=lambda row: (row["status"] == "completed", -math.inf if math.isnan(row[key]) else row[key]),
              reverse=True)
    return rows


def format_rows(rows: list[dict[str, Any]], key: str) -> str:
    names = list(rows[0]["values"]) if rows else []

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    header = ["trial", "status", "epochs", key, *(n.rsplit(".", 1)[-1] for n in names)]
    body = [[r["trial"], r["status"], str(r["epochs"]), cell(r[key]), *(cell(r["values"].get(n)) for n in names)]
            for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(s.ljust(w) for s, w in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    errors = [f"{r['trial']}: {r['error']}" for r in rows if r["error"]]
    return "\n".join(lines + errors)


CONSENSUS_MIN = 3  # completed trials --pick consensus needs: with two, both have the same consensus


def by_consensus(done: list[dict[str, Any]], out: str, split: str) -> list[dict[str, Any]]:
    """The completed trials with their `consensus` (mean NMI of their clusters on `split` with the others'), best
    first; ties keep the metric's order."""
    from djc.runfiles import clusters_by_index, read_assignments
    from djc.selection import consensus

    labelings = [clusters_by_index(read_assignments(f"{out}/trials/{r['trial']}/assignments.parquet"), split)
                 for r in done]
    scored = [{**r, "consensus": c} for r, c in zip(done, consensus(labelings))]
    return sorted(scored, key=lambda r: -r["consensus"])  # stable: the metric's order among equals


def choose(done: list[dict[str, Any]], pick: str, key: str, out: str, split: str) -> tuple[list[dict[str, Any]], str]:
    """The completed trials in the order best.yaml takes the first of, and the key they are ordered by: as ranked
    by `key`, or by consensus (then also printed and written to OUT/consensus.txt)."""
    if pick != "consensus":
        return done, key
    if len(done) < CONSENSUS_MIN:
        print(f"[djc tune] --pick consensus needs {CONSENSUS_MIN} completed trials, {len(done)} completed: "
              f"picking by {key}", flush=True)
        return done, key
    from djc.runfiles import write_text

    done = by_consensus(done, out, split)
    lines = [f"{r['trial']}  consensus {r['consensus']:.4f}  {key} {r[key]:.4f}" for r in done]
    print(f"\n[djc tune] completed trials by consensus (mean NMI with the others on split {split!r}):\n"
          + "\n".join(lines), flush=True)
    write_text(f"{out}/consensus.txt", "\n".join(lines) + "\n")
    return done, "consensus"


def best_yaml(tree: dict[str, Any], best: dict[str, Any], key: str, command: str, n: int) -> str:
    """The run config as given (only what differs from the defaults) with the best trial's values set."""
    name = tree.get("name", Config().name)
    chosen = with_values(tree, {**best["values"], "name": f"{name}_tuned"})
    values = "\n".join(f"#   {k}: {v!r}" for k, v in best["values"].items())
    head = (f"# Written by `{command}`.\n# Best of {n} trials by {key} = {best[key]:.4f} (higher is better) after "
            f"{best['epochs']} epochs: trial {best['trial']}, whose values are\n{values}\n"
            f"# Train it with: djc train THIS_FILE\n")
    return head + yaml.safe_dump(chosen, sort_keys=False)


def main(args: argparse.Namespace) -> int:
    from djc import launch, ray_setup
    from djc.runfiles import write_text

    if args.samples < 1:
        raise ConfigError(f"--samples {args.samples}: a search needs at least one trial")
    tree = load_tree(args.config, args.overrides)
    cfg = from_dict(tree)
    if cfg.trainer.in_process:
        raise ConfigError("trainer.in_process=true: djc tune runs its trials as Ray Tune trials, each a Ray Train "
                          "run; leave trainer.in_process false for a search")
    if not cfg.eval.select_split:  # the first held-out split, else the training set itself
        tree = with_values(tree, {"eval.select_split": next(iter(cfg.data.eval), "train")})
        cfg = from_dict(tree)
    space = spaces.load(args.space)(cfg)
    check_space(args.space, space, tree, cfg)
    cfg = launch.resolve(cfg)
    out = launch.absolute(launch.out_url(args.out or f"runs/tune/{cfg.name}"))
    launch.check_shared_storage(cfg, out)  # trials' run dirs under --out, written by workers on any node
    launch.ensure_datasets(cfg)
    launch.check_against_data(cfg)
    _check_metric(cfg, args.metric)
    print(f"[djc tune] {args.samples} trials of space {args.space!r} ({', '.join(space)}), ranked by "
          f"{METRICS[args.metric]} on split {cfg.eval.select_split!r}, search {args.search}, scheduler "
          f"{args.scheduler}; out: {out}",
          flush=True)

    ray_setup.ensure_ray(cfg)
    ray_setup.check_resources(cfg)
    first = job_values(space, tree)
    if first is None:
        print("[djc tune] the job's own values lie outside the space: the search does not start from them", flush=True)
    grid = run(cfg, space, args.samples, out, args.metric, args.scheduler, args.search, first)

    key = METRICS[args.metric]
    rows = trial_rows(grid, key, cfg.optim.epochs)
    table = format_rows(rows, key)
    job = [r["trial"] for r in rows if first is not None and r["values"] == first]
    if job:
        table += f"\n{job[0]} is the job's own values"
    print(f"\n{table}")
    write_text(f"{out}/trials.txt", table + "\n")
    done = [r for r in rows if r["status"] == "completed" and not math.isnan(r[key])]
    if not done:
        print("djc tune: error: no trial ran all its epochs; see the errors above", flush=True)
        return 1
    done, key = choose(done, args.pick, key, out, cfg.eval.select_split)
    command = " ".join(["djc tune", args.config, "--space", args.space, "--samples", str(args.samples),
                        *(["--pick", args.pick] if args.pick != "score" else []), *args.overrides])
    write_text(f"{out}/best.yaml", best_yaml(tree, done[0], key, command, len(rows)))
    print(f"[djc tune] best: {done[0]['trial']} {key} {done[0][key]:.4f}; wrote {out}/best.yaml "
          f"(djc train {out}/best.yaml)")
    return 0
