"""djc prepare | train | eval | predict | tune | bench: the command line, a thin layer over the library.

Errors a user can fix (bad config key, missing dataset, corrupt shard) print one clear message and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import re
import sys

from djc import launch, storage
from djc.config import ConfigError, from_dict, load_config
from djc.data.shards import DatasetError

USER_ERRORS = launch.USER_ERRORS


def cmd_train(args: argparse.Namespace) -> int:
    from djc.evaluate import metrics_table

    overrides = args.overrides
    if args.in_process:
        overrides = [*overrides, "trainer.in_process=true", "trainer.num_workers=1"]
    cfg = launch.resolve(load_config(args.config, overrides))
    run_dir = launch.absolute(launch.out_url(args.out or f"runs/{cfg.name}"))
    storage.configure(cfg.storage)
    storage.require_bucket(run_dir)
    launch.check_shared_storage(cfg, run_dir)  # before any data is prepared
    launch.ensure_datasets(cfg)
    launch.check_against_data(cfg)
    result = launch.run(cfg, run_dir)
    print(metrics_table(result))
    print(f"[djc] outputs in {run_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import fsspec

    from djc.data.shards import read_manifest
    from djc.evaluate import MAP_FILE, Pictures, metrics_table, write_outputs
    from djc.rundir import read_config
    from djc.runfiles import read_assignments, read_map

    run_dir = launch.out_url(args.run_dir, flag="djc eval")
    cfg = read_config(run_dir)
    storage.configure(cfg.storage)
    if args.rerun:
        from djc import predict

        print(metrics_table(predict.rerun_end(launch.absolute(run_dir.rstrip("/")))))
        return 0
    try:
        table = read_assignments(f"{run_dir}/assignments.parquet")
        fs, path = fsspec.core.url_to_fs(f"{run_dir}/{MAP_FILE}")
        coords = read_map(f"{run_dir}/{MAP_FILE}") if fs.exists(path) else None
        result = write_outputs(run_dir, table, cfg.method.num_clusters, read_manifest(cfg.data.train).class_counts,
                               cfg.eval.primary, Pictures(cfg.data.splits(), cfg.eval, coords))
    except ValueError as err:  # assignments.parquet damaged or missing columns
        raise DatasetError(str(err)) from None
    print(metrics_table(result))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from djc import predict

    return predict.main(args)


def cmd_prepare(args: argparse.Namespace) -> int:
    from djc.data.prepare import prepare

    if args.source in ("folder", "cifar10", "cifar100", "imagenet-lt") and not args.root:
        raise ConfigError(f"djc prepare {args.source} needs --root DIR")
    if (args.size is not None and args.source not in ("folder", "imagenet-lt", "imagenet-lt-synthetic")) or (
            args.mode != "auto" and args.source != "folder"):
        raise ConfigError(f"--size and --mode apply to folder sources (and --size to imagenet-lt and "
                          f"imagenet-lt-synthetic); {args.source} images have one shape already")
    if args.source == "imagenet-lt":
        try:
            return _prepare_imagenet_lt(args)
        except ValueError as err:  # the split list's and the writer's checks
            raise DatasetError(str(err)) from None
    try:
        m = prepare(args.source, launch.out_url(args.out), root=args.root, split=args.split,
                    imbalance_ratio=args.imbalance_ratio, profile=args.profile, seed=args.seed,
                    overwrite=args.overwrite, size=args.size, mode=args.mode)
    except ValueError as err:  # the source's and the writer's checks: the user's to fix
        raise DatasetError(str(err)) from None
    counts = (f"class counts {m.class_counts}" if m.num_classes <= 20 else
              f"{m.num_classes} classes, {max(m.class_counts)} -> {min(m.class_counts)} images")
    print(f"[djc] wrote {m.num_samples} samples in {len(m.shards)} shards to {args.out}; {counts}")
    return 0


def _prepare_imagenet_lt(args: argparse.Namespace) -> int:
    from djc.data.imagenet_lt import prepare_imagenet_lt

    if not args.split_file:
        raise ConfigError("djc prepare imagenet-lt needs --split-file ImageNet_LT_<split>.txt")
    m = prepare_imagenet_lt(args.root, args.split_file, launch.out_url(args.out), size=args.size or 256,
                            quality=args.quality,
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
        from djc.bench import throughput

        return throughput.main(args)
    if args.which == "data":
        from djc.bench import data

        return data.main(args)
    if args.which == "selection":
        from djc.bench import selection

        return selection.main(args)
    if args.which == "scale":
        from djc.bench import scale

        return scale.main(args)
    from djc.bench import quality

    return quality.main(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="djc", description="Deep clustering of long-tailed image collections")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prepare", help="write a dataset (manifest + Parquet shards) at any fsspec URL")
    pr.add_argument("source", choices=["digits", "shapes", "cifar10", "cifar100", "folder", "imagenet-lt",
                                       "imagenet-lt-synthetic"])
    pr.add_argument("--out", required=True, help="dataset URL: a path, file://, s3://bucket/prefix, memory://")
    pr.add_argument("--root", help="source folder (cifar pickle release, image folder)")
    pr.add_argument("--split", default="train", choices=["train", "test"])
    pr.add_argument("--imbalance-ratio", type=float, default=1.0, help="largest / smallest class (1 = as is)")
    pr.add_argument("--profile", default="exp", choices=["exp", "step"])
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--overwrite", action="store_true")
    il = pr.add_argument_group("imagenet-lt", "images re-encoded once as size x size JPEGs, in parallel, resumable")
    il.add_argument("--split-file", help="ImageNet_LT_{train,val,test}.txt: 'relative/path label' per line")
    pr.add_argument("--size", type=int, default=None,
                    help="folder, imagenet-lt: short side resized to this, then centre-cropped square (imagenet-lt: "
                         "256 by default; folder: needed when image sizes differ); imagenet-lt-synthetic: the "
                         "generated images' side (16 by default)")
    pr.add_argument("--mode", default="auto", choices=["auto", "rgb", "gray"],
                    help="folder: channels of every image (auto: the majority of the folder's images)")
    il.add_argument("--quality", type=int, default=90, help="JPEG quality of the re-encoded images")
    il.add_argument("--rows-per-shard", type=int, default=1024)
    il.add_argument("--workers", type=int, default=None, help="encoding processes (default: one per CPU)")
    il.add_argument("--max-shards", type=int, default=None, help="stop after this many shards (resume later)")
    pr.set_defaults(func=cmd_prepare)

    tr = sub.add_parser("train", help="train on Ray (local by default); resumes when --out holds a checkpoint")
    tr.add_argument("config", help="run config YAML (jobs/*.yaml)")
    tr.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    tr.add_argument("--out", help="run dir (path or s3:// URL); default runs/<name>")
    tr.add_argument("--in-process", action="store_true",
                    help="train in this process without Ray (trainer.in_process=true trainer.num_workers=1): "
                         "the same loop and run dir, for a machine without Ray or for debugging")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="recompute metrics.json and plots from a run dir's assignments")
    ev.add_argument("run_dir")
    ev.add_argument("--rerun", action="store_true",
                    help="run the end of the run again from its final checkpoint, in this process: predictions, "
                         "baselines (any added to djc since the run), metrics and pictures")
    ev.set_defaults(func=cmd_eval)

    pc = sub.add_parser("predict", help="apply a trained run to a data set: assignments, embeddings, galleries, map")
    pc.add_argument("run_dir", help="a run dir djc train wrote (its final checkpoint and config are used)")
    pc.add_argument("--data", required=True, help="dataset URL (djc prepare's format; unlabelled is fine)")
    pc.add_argument("--out", required=True, help="output dir (path or s3:// URL)")
    pc.add_argument("--workers", type=int, default=1, help="1: this process (no Ray); N: N Ray Train workers")
    pc.add_argument("--embeddings", nargs="?", const="float32", choices=["float32", "float16"],
                    help="also write embeddings.npy, (N, D) unit-length features in assignments.parquet's row order "
                         "(float32 unless float16 is given)")
    pc.add_argument("--on-corrupt", default="error", choices=["error", "skip"],
                    help="an undecodable image: stop (error) or leave it out (skip)")
    pc.set_defaults(func=cmd_predict)

    tu = sub.add_parser("tune", help="Ray Tune search (ASHA) over a method's space; writes best.yaml for djc train")
    tu.add_argument("config", help="run config YAML (jobs/*.yaml): the base every trial starts from")
    tu.add_argument("overrides", nargs="*", help="key.sub=value overrides of the base")
    tu.add_argument("--space", required=True, help="a method's name (its space in djc/methods/__init__.py) or "
                                                         "package.module:function")
    tu.add_argument("--samples", type=int, default=8, help="number of trials")
    tu.add_argument("--out", help="search dir (trials/, best.yaml, trials.txt); default runs/tune/<name>")
    tu.add_argument("--metric", default="score", choices=["score", "acc", "balanced_acc"],
                    help="score: label-free (djc/selection.py); acc / balanced_acc: on a labelled eval.select_split")
    tu.add_argument("--scheduler", default="asha", choices=["asha", "fifo"], help="asha stops poor trials early")
    tu.add_argument("--search", default="optuna", choices=["optuna", "hyperopt", "random"],
                    help="optuna: Optuna's TPE (default); hyperopt: HyperOpt's TPE; random: random sampling. "
                         "The job's own values are always the first trial")
    tu.add_argument("--pick", default="score", choices=["score", "consensus"],
                    help="which completed trial best.yaml takes: score = the best by --metric; consensus = the one "
                         "whose clusters agree most with the other completed trials' (mean NMI; needs 3)")
    tu.set_defaults(func=cmd_tune)

    be = sub.add_parser("bench", help="benchmarks: quality (every method against k-means, over data sets and "
                                      "seeds), throughput (the training step against a plain PyTorch loop), data "
                                      "(local disk vs S3 vs cache, read and training step rates), selection (the "
                                      "label-free selection score against balanced ACC over finished runs), scale (every "
                                      "method at ImageNet-LT's N and K up to 10,000)")
    be.add_argument("which", choices=["quality", "throughput", "data", "selection", "scale"])
    be.add_argument("--config", nargs="+", help="quality: run configs to compare (default: each registered "
                                                        "method's digits_lt job)")
    be.add_argument("--data", action="append", default=[],
                    help="quality: NAME:key=v,key=v - a data set as overrides applied to every config "
                         "(repeatable; default: lt10 as configured, and balanced digits)")
    be.add_argument("--pretext", default=None,
                    help="quality: a pretext job (contrastive, no clustering term); each config also runs on its "
                         "frozen encoder, per data set and seed, as '<method> (pretext)' with k-means on it")
    be.add_argument("--pretext-head", action="store_true",
                    help="quality: the configs cluster on the pretext run's normalised projection outputs "
                         "(model.weights_head), not on its backbone's features")
    be.add_argument("--pair-views", default="cached", choices=["cached", "augmented"],
                    help="quality: cached (default) = the pairs see the plain images, so the frozen encoder's "
                         "features are computed once; augmented = each config's own views through the frozen "
                         "encoder every step (P2OT's release recipe: an invariance signal for the head)")
    be.add_argument("--pair-neighbors", type=int, default=0,
                    help="quality: with cached pair views, a pair's second view is one of each sample's N nearest "
                         "neighbours in the pretext's features (augment.neighbors, SCAN's mining); 0 = off")
    be.add_argument("--stages", default="scratch,pairs",
                    help="quality: which runs, a comma list of scratch (each config from scratch) and pairs (with "
                         "--pretext: the pretext run and each config on it)")
    be.add_argument("--reuse", action="store_true",
                    help="quality: read a run whose run dir already holds its results from the same config (the "
                         "bench writes bench.json beside metrics.json) instead of running it again")
    be.add_argument("--seeds", type=int, default=3)
    be.add_argument("--out", default="runs/bench")
    be.add_argument("overrides", nargs="*", help="key.sub=value overrides applied to every run")
    # Shared by throughput and data; 0 = the benchmark's own default (throughput: the device's).
    be.add_argument("--batch-size", type=int, default=0, help="throughput: per model (0: device default); "
                                                              "data: reads and steps (0: 128); scale: global (0: 256)")
    be.add_argument("--steps", type=int, default=0, help="timed steps per round and source (0: default; data: 10)")
    be.add_argument("--rounds", type=int, default=0, help="interleaved rounds of every measurement (0: default; "
                                                          "data: 3, best kept; scale: 3, medians)")
    tp = be.add_argument_group("throughput", "defaults depend on the device (CPU: small, a few minutes)")
    tp.add_argument("--models", default="resnet18_cifar,resnet50", help="resnet18_cifar (32 px), resnet50 (224 px)")
    tp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    tp.add_argument("--methods", default=None,
                    help="each method's step against the plain loop of its network, at the first model's setting: "
                         "all or a comma list of method names (default: all on CUDA, none on a CPU)")
    tp.add_argument("--profile", default="auto", choices=["auto", "always", "never"],
                    help="torch.profiler summaries in --out: auto = when SeCu's djc / reference < 0.97 or a "
                         "method's cluster side > 10%% of its step")
    sc = be.add_argument_group("scale", "ImageNet-LT's N, K from 10 to 10,000 (docs/scale.md)")
    sc.add_argument("--ks", default="10,100,1000,10000", help="scale: the numbers of clusters")
    sc.add_argument("--gpu-k", type=int, default=1000, help="scale: the K whose cluster side is extrapolated to "
                                                            "an H100 / H200 step")
    sc.add_argument("--gpu-only", action="store_true", help="scale: only the GPU census at --gpu-k (about a minute)")
    sc.add_argument("--dataset", default=None, help="scale: the data set (default: runs/data/imagenet_lt_synthetic/"
                                                    "train, which `djc prepare imagenet-lt-synthetic` writes)")
    da = be.add_argument_group("data", "local disk vs loopback S3 vs cache")
    da.add_argument("--samples", type=int, default=4096, help="images in the benchmark dataset")
    da.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes (data.loader_workers)")
    se = be.add_argument_group("selection", "the label-free selection score against balanced ACC over finished runs")
    se.add_argument("--runs", nargs="+", help="run dirs, or dirs holding them (djc tune's search dirs)")
    se.add_argument("--cached", action="store_true", help="reuse --out's measurements of runs measured before")
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
        print(f"djc: error: {one_line(err)}", file=sys.stderr)
        return 2


_SECRET_IN_URL = re.compile(r"(\w+://)[^/@\s:]*:[^/@\s]*@")


def one_line(err: BaseException) -> str:
    """The message a user sees: an OSError as 'reason: path', and never a user:secret@ of a URL."""
    if isinstance(err, OSError) and err.strerror and err.filename:
        msg = f"{err.strerror}: {err.filename}"
    else:
        msg = str(err) or type(err).__name__
    return _SECRET_IN_URL.sub(r"\1***@", msg)


if __name__ == "__main__":
    sys.exit(main())
