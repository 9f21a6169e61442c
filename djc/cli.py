"""djc prepare | train | eval | tune | bench: the command line, a thin layer over the library.

Errors a user can fix (bad config key, missing dataset, corrupt shard) print one clear message and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from djc import storage
from djc.config import Config, ConfigError, from_dict, has_credentials, load_config, to_dict, to_yaml
from djc.data.shards import DatasetError

USER_ERRORS = (ConfigError, DatasetError, FileNotFoundError, storage.StorageError)


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _absolute(url: str) -> str:
    # Ray workers do not share the driver's working directory: local paths travel as absolute ones.
    return str(Path(url.removeprefix("file://")).expanduser().resolve()) if url and _is_local(url) else url


def resolve(cfg: Config) -> Config:
    tree = to_dict(cfg)
    tree["data"]["train"] = _absolute(cfg.data.train)
    tree["data"]["eval"] = {k: _absolute(v) for k, v in cfg.data.eval.items()}
    return from_dict(tree)


def ensure_datasets(cfg: Config) -> None:
    """Prepare the run's datasets on first use when the config names a source; otherwise refuse clearly."""
    from djc.data.prepare import dataset_exists, prepare

    wanted = {"train": cfg.data.train, **cfg.data.eval}
    for split, url in wanted.items():
        if dataset_exists(url):
            continue
        if not cfg.data.source:
            raise DatasetError(f"no dataset at {url} (data.{'train' if split == 'train' else 'eval.' + split}); "
                               f"run `djc prepare` or set data.source to make it on first use")
        print(f"[djc] preparing {cfg.data.source} {split} split at {url}", file=sys.stderr)
        prepare(cfg.data.source, url, root=cfg.data.source_root or None, split="train" if split == "train" else "test",
                imbalance_ratio=cfg.data.imbalance_ratio if split == "train" else 1.0,
                profile=cfg.data.profile, seed=cfg.data.prepare_seed)


def check_against_data(cfg: Config) -> None:
    """Checks that need the manifest, still before any worker starts."""
    from djc.data.shards import read_manifest

    m = read_manifest(cfg.data.train)
    if m.num_samples < cfg.data.batch_size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is larger than the dataset "
                          f"({m.num_samples} samples at {cfg.data.train})")
    for url in cfg.data.eval.values():
        read_manifest(url)


def cmd_train(args: argparse.Namespace) -> int:
    from djc import train
    from djc.export import write_text
    from djc.outputs import metrics_table

    cfg = resolve(load_config(args.config, args.overrides))
    run_dir = _absolute(_out_url(args.out or f"runs/{cfg.name}"))
    storage.configure(cfg.storage)
    storage.require_bucket(run_dir)
    ensure_datasets(cfg)
    check_against_data(cfg)
    print(f"[djc] run dir: {run_dir}\n[djc] resolved config:\n{to_yaml(cfg)}", flush=True)
    write_text(f"{run_dir}/config.yaml", to_yaml(cfg))
    result = train.fit(cfg, run_dir)
    print(metrics_table(result))
    print(f"[djc] outputs in {run_dir}")
    return 0


def _out_url(url: str) -> str:
    if has_credentials(url):  # it would be printed, and stored by Ray in its run state
        raise ConfigError(f"--out {url.split('://')[0]}://...@... holds credentials; give them through the "
                          f"environment or an AWS profile instead")
    return url.rstrip("/")


def cmd_eval(args: argparse.Namespace) -> int:
    from djc.data.shards import read_manifest
    from djc.outputs import metrics_table, write_metrics

    cfg = load_config(args.run_dir.rstrip("/") + "/config.yaml") if _is_local(args.run_dir) else None
    if cfg is None:
        import yaml

        from djc.export import read_text

        cfg = from_dict(yaml.safe_load(read_text(args.run_dir.rstrip("/") + "/config.yaml")))
    storage.configure(cfg.storage)
    result = write_metrics(args.run_dir.rstrip("/"), cfg.method.num_clusters,
                           read_manifest(cfg.data.train).class_counts, cfg.eval.primary)
    print(metrics_table(result))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from djc.data.prepare import prepare

    if args.source in ("folder", "cifar10", "cifar100", "imagenet-lt") and not args.root:
        raise ConfigError(f"djc prepare {args.source} needs --root DIR")
    if args.source == "imagenet-lt":
        return _prepare_imagenet_lt(args)
    m = prepare(args.source, _out_url(args.out), root=args.root, split=args.split,
                imbalance_ratio=args.imbalance_ratio, profile=args.profile, seed=args.seed, overwrite=args.overwrite)
    print(f"[djc] wrote {m.num_samples} samples in {len(m.shards)} shards to {args.out}; "
          f"class counts {m.class_counts}")
    return 0


def _prepare_imagenet_lt(args: argparse.Namespace) -> int:
    from djc.data.imagenet_lt import prepare_imagenet_lt

    if not args.split_file:
        raise ConfigError("djc prepare imagenet-lt needs --split-file ImageNet_LT_<split>.txt")
    m = prepare_imagenet_lt(args.root, args.split_file, args.out, size=args.size, quality=args.quality,
                            rows_per_shard=args.rows_per_shard, seed=args.seed, workers=args.workers,
                            max_shards=args.max_shards, overwrite=args.overwrite)
    if m is None:
        print(f"[djc] stopped after --max-shards {args.max_shards}; run the same command again to continue")
    else:
        print(f"[djc] wrote {m.num_samples} samples in {len(m.shards)} shards to {args.out}; "
              f"{m.num_classes} classes, {max(m.class_counts)} -> {min(m.class_counts)} images")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from tune import search

    return search.main(args)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.which == "throughput":
        from djc import bench_throughput

        return bench_throughput.main(args)
    if args.which == "data":
        from djc import bench_data

        return bench_data.main(args)
    from djc import bench

    return bench.main(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="djc", description="Deep clustering of long-tailed image collections")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prepare", help="write a dataset (manifest + Parquet shards) at any fsspec URL")
    pr.add_argument("source", choices=["digits", "cifar10", "cifar100", "folder", "imagenet-lt"])
    pr.add_argument("--out", required=True, help="dataset URL: a path, file://, s3://bucket/prefix, memory://")
    pr.add_argument("--root", help="source folder (cifar pickle release, image folder)")
    pr.add_argument("--split", default="train", choices=["train", "test"])
    pr.add_argument("--imbalance-ratio", type=float, default=1.0, help="largest / smallest class (1 = as is)")
    pr.add_argument("--profile", default="exp", choices=["exp", "step"])
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--overwrite", action="store_true")
    il = pr.add_argument_group("imagenet-lt", "images re-encoded once as size x size JPEGs, in parallel, resumable")
    il.add_argument("--split-file", help="ImageNet_LT_{train,val,test}.txt: 'relative/path label' per line")
    il.add_argument("--size", type=int, default=256, help="short side resized to this, then centre-cropped square")
    il.add_argument("--quality", type=int, default=90, help="JPEG quality of the re-encoded images")
    il.add_argument("--rows-per-shard", type=int, default=1024)
    il.add_argument("--workers", type=int, default=None, help="encoding processes (default: one per CPU)")
    il.add_argument("--max-shards", type=int, default=None, help="stop after this many shards (resume later)")
    pr.set_defaults(func=cmd_prepare)

    tr = sub.add_parser("train", help="train on Ray (local by default); resumes when --out holds a checkpoint")
    tr.add_argument("config", help="run config YAML (jobs/*.yaml)")
    tr.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    tr.add_argument("--out", help="run dir (path or s3:// URL); default runs/<name>")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="recompute metrics.json and plots from a run dir's assignments")
    ev.add_argument("run_dir")
    ev.set_defaults(func=cmd_eval)

    tu = sub.add_parser("tune", help="Ray Tune search (ASHA) over a method's space; writes best.yaml for djc train")
    tu.add_argument("config", help="run config YAML (jobs/*.yaml): the base every trial starts from")
    tu.add_argument("overrides", nargs="*", help="key.sub=value overrides of the base")
    tu.add_argument("--space", required=True, help="secu | dcl | statdec | aecm | p2ot | package.module:function")
    tu.add_argument("--samples", type=int, default=8, help="number of trials")
    tu.add_argument("--out", help="search dir (trials/, best.yaml, trials.txt); default runs/tune/<name>")
    tu.add_argument("--metric", default="score", choices=["score", "acc", "balanced_acc"],
                    help="score: label-free (djc/selection.py); acc / balanced_acc: on a labelled eval.select_split")
    tu.add_argument("--scheduler", default="asha", choices=["asha", "fifo"], help="asha stops poor trials early")
    tu.set_defaults(func=cmd_tune)

    be = sub.add_parser("bench", help="benchmarks: quality (every method against k-means, over data sets and "
                                      "seeds), throughput (the training step against a plain PyTorch loop), data "
                                      "(local disk vs S3 vs cache, read and training step rates)")
    be.add_argument("which", choices=["quality", "throughput", "data"])
    be.add_argument("--config", nargs="+", help="quality: run configs to compare (default: the five digits_lt jobs)")
    be.add_argument("--data", action="append", default=[],
                    help="quality: NAME:key=v,key=v - a data set as overrides applied to every config "
                         "(repeatable; default: lt10 as configured, and balanced digits)")
    be.add_argument("--seeds", type=int, default=3)
    be.add_argument("--out", default="runs/bench")
    be.add_argument("overrides", nargs="*", help="key.sub=value overrides applied to every run")
    # Shared by throughput and data; 0 = the benchmark's own default (throughput: the device's).
    be.add_argument("--batch-size", type=int, default=0, help="throughput: per model (0: device default); "
                                                              "data: reads and steps (0: 128)")
    be.add_argument("--steps", type=int, default=0, help="timed steps per round and source (0: default; data: 10)")
    be.add_argument("--rounds", type=int, default=0, help="interleaved rounds of every measurement (0: default; "
                                                          "data: 3, best kept)")
    tp = be.add_argument_group("throughput", "defaults depend on the device (CPU: small, a few minutes)")
    tp.add_argument("--models", default="resnet18_cifar,resnet50", help="resnet18_cifar (32 px), resnet50 (224 px)")
    tp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    tp.add_argument("--methods", default=None,
                    help="each method's step against the plain loop of its network, at the first model's setting: "
                         "all or a list of secu,dcl,statdec,aecm,p2ot (default: all on CUDA, none on a CPU)")
    tp.add_argument("--profile", default="auto", choices=["auto", "always", "never"],
                    help="torch.profiler summaries in --out: auto = when SeCu's djc / reference < 0.97 or a "
                         "method's cluster side > 10%% of its step")
    da = be.add_argument_group("data", "local disk vs loopback S3 vs cache")
    da.add_argument("--samples", type=int, default=4096, help="images in the benchmark dataset")
    da.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes (data.loader_workers)")
    be.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    # Overrides may follow options (`djc train CFG --out D a.b=1`): collect every leftover key=value.
    args, rest = p.parse_known_args(argv)
    unknown = [r for r in rest if "=" not in r or r.startswith("-")]
    if unknown or (rest and not hasattr(args, "overrides")):
        p.error(f"unrecognized arguments: {' '.join(unknown or rest)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"djc: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
