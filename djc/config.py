"""The typed config tree: defaults are the recommended values, YAML overrides what differs.

A run config (jobs/*.yaml) holds only the keys that differ from these defaults; `key.sub=value` on the command
line overrides both. Unknown keys and impossible values are refused with a message that names the key, before
any worker starts. The config is frozen after parsing: derived quantities are computed where they are used.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, model_validator

from djc import methods
from djc.confignode import Node
from djc.models.settings import ModelConfig


def has_credentials(url: str) -> bool:
    """Whether a URL carries user:secret@ in its authority (s3://KEY:SECRET@bucket, http://u:p@host)."""
    scheme, sep, rest = url.partition("://")
    return bool(sep) and "@" in rest.split("/", 1)[0]


class ConfigError(ValueError):
    """A config that cannot run; the message names the offending key."""


class DataConfig(Node):
    train: str = "runs/data/digits_lt10/train"  # dataset URL (path, file://, s3://, memory://) trained on
    eval: dict[str, str] = Field(default_factory=dict)  # extra splits evaluated at the end: name -> URL
    # If `train` (or an eval URL) holds no dataset yet, make it from this source on first use ("" = never).
    source: Literal["", "digits", "shapes", "cifar10", "cifar100", "folder", "imagenet-lt-synthetic"] = ""
    source_root: str = ""  # where cifar/folder sources live (ignored for the sources djc makes: digits, shapes, ..)
    imbalance_ratio: float = Field(1.0, ge=1.0)  # long-tail ratio for the prepared train split (1 = balanced)
    profile: Literal["exp", "step"] = "exp"  # long-tail profile (docs/data.md)
    prepare_seed: int = 0  # seed of the train/test split and of the long-tail subset (and of shapes' images)
    batch_size: int = Field(128, gt=0)  # GLOBAL batch over all workers; each worker takes batch_size / workers
    loader_workers: int = Field(0, ge=0)  # DataLoader processes per training worker (0 = decode in-process)
    window: int = Field(16, gt=0)  # row groups shuffled together; larger = better mixing, more memory
    # skip = drop undecodable images and count them; each step then trains on the smallest local batch of the
    # step over workers (one small all-reduce per step), and evaluation leaves them out of the outputs
    on_corrupt: Literal["error", "skip"] = "error"
    # Local disk cache of remote shards for later epochs ("" = off). Per node: each worker expands ~ and
    # environment variables itself ($TMPDIR/djc-cache, $SLURM_TMPDIR/djc), so every node caches on its own disk.
    cache_dir: str = ""
    # Bound of cache_dir: least recently used shards are deleted past it (it may be exceeded by one shard
    # per process downloading at that moment). Shared by every worker on a node that uses the same dir.
    cache_max_gb: float = Field(20.0, gt=0.0)
    # Batches whose row groups are fetched ahead, in background threads, while the current one decodes:
    # hides storage latency (S3 ~10-50 ms a request) from the loader. 0 = read on demand.
    prefetch_batches: int = Field(4, ge=0)
    retries: int = Field(5, gt=0)  # attempts per shard read on transient storage errors (backoff 0.2 s, 0.4 s, ...)

    def splits(self) -> dict[str, str]:
        """Every split a run reads and evaluates: name -> dataset URL, "train" first."""
        return {"train": self.train, **self.eval}


class StorageConfig(Node):
    """Where object storage is and who we are there. Names only: credentials come from the environment,
    an AWS profile or an instance role, never from here, because this config is printed and stored."""

    endpoint_url: str = ""  # S3-compatible endpoint (http://127.0.0.1:9000); "" = AWS_ENDPOINT_URL or AWS itself
    region: str = ""  # "" = AWS_REGION / AWS_DEFAULT_REGION / the profile's region
    profile: str = ""  # a named profile of ~/.aws/{config,credentials}; "" = AWS_PROFILE or the default chain
    # Local paths (--out, data.*) name a filesystem that every Ray node mounts at the same path (NFS, Lustre, a
    # cloud file share). Off: a run whose local paths would be used by workers on other nodes is refused.
    shared_filesystem: bool = False


class AugmentConfig(Node):
    crop_scale_min: float = Field(0.3, gt=0.0, le=1.0)  # RandomResizedCrop lower scale (0.2 CIFAR-100, 0.08 ImageNet)
    # Its upper scale: 1 = torchvision's (a crop within the image). Above 1 a box may hold more than the image, which
    # then sits inside it with its border pixels repeated around: the view zooms out. For objects whose size varies
    # per image more than crops alone cover (shapes: 12-24 px across); 1 (SeCu) by default.
    crop_scale_max: float = Field(1.0, gt=0.0, le=4.0)
    hflip: bool = True  # off for digits and text: a mirrored 2 is not a 2
    strength: float = Field(1.0, ge=0.0)  # multiplies the colour-jitter amplitudes; 0 disables jitter
    # Probability that a view is turned grey (SeCu, SimCLR: 0.2). Raise it when colour alone tells images apart
    # (randomly coloured objects): a grey view can only be matched to its pair by shape.
    gray_p: float = Field(0.2, ge=0.0, le=1.0)
    degrees: float = Field(0.0, ge=0.0, le=180.0)  # random rotation ~ U(-d, d), both views; 0 = none (SeCu)
    # Probability that a view is inverted (x -> 1 - x), both views; 0 = never (SeCu). For objects that come light on
    # dark and dark on light alike: otherwise the shared polarity is an identity cue a contrastive loss learns.
    invert_p: float = Field(0.0, ge=0.0, le=1.0)
    # Gaussian pixel noise added to each view, std ~ U(0, noise) in [0, 1] units; 0 = none (SeCu). For data whose
    # noise level varies per image: both views share it, so without this the features learn it as identity.
    noise: float = Field(0.0, ge=0.0, le=1.0)
    # Side of the views; 0 = the dataset's image side, or with model.weights the side the backbone was trained at
    # (224; a ViT's is fixed by its position embeddings), the images resized on the device (djc/data/inputs.py)
    out_size: int = Field(0, ge=0)
    # The training views: secu = SeCu's asymmetric pair (crop, flip, colour jitter, grey, blur, solarize; the keys
    # above shape it); crop_flip = random resized crop and flip only (P2OT's release on DINO ViT-B/16); none = the
    # plain view twice: nothing augments the backbone's input, so with model.freeze=all its features are computed once
    policy: Literal["secu", "crop_flip", "none"] = "secu"
    # With features computed once (model.freeze=all, policy none): the second view of a sample is one of its
    # `neighbors` nearest neighbours in the frozen feature space (cosine), drawn anew each step, instead of the sample
    # itself. SCAN's mined neighbours: cached features have no augmentation, and a neighbour is the view that
    # teaches invariance (docs/pretrained.md). 0 = the sample itself.
    neighbors: int = Field(0, ge=0)


class KMeansConfig(Node):
    iters: int = Field(50, gt=0)  # Lloyd iterations of the baseline
    restarts: int = Field(3, gt=0)  # k-means++ restarts; the lowest inertia wins


class _MethodSection(Node):
    num_clusters: int = Field(10, gt=1)  # K of the evaluated head (the number of classes when known)
    kmeans: KMeansConfig = KMeansConfig()

    def selected(self) -> methods.MethodSettings:
        """The section of the method `name` selects."""
        return getattr(self, self.name)


def _method_config() -> type[Node]:
    """`method`: name (one of the registry's), num_clusters, kmeans, and every registered method's own section
    (djc/methods/__init__.py), each defined beside its method."""
    sections: dict[str, Any] = {name: (e.config, e.config()) for name, e in methods.REGISTRY.items()}
    return create_model("MethodConfig", __base__=_MethodSection, __module__=__name__,
                        name=(Literal[tuple(methods.REGISTRY)], "secu"), **sections)


MethodConfig = _method_config()


class OptimConfig(Node):
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.2, ge=0.0)  # encoder lr at the global batch of 128; scaled linearly with batch size
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    epochs: int = Field(400, gt=0)
    frozen_epochs: int = Field(1, ge=0)  # encoder lr 0 while the centers settle (SeCu: epoch 0)
    warmup_epochs: int = Field(10, ge=0)  # linear warm-up after the frozen epochs, then cosine to 0


class TrainerConfig(Node):
    num_workers: int = Field(2, gt=0)  # Ray Train workers (one process each)
    # One process and no Ray (`djc train --in-process`): the same loop and run dir, for machines without Ray,
    # debugging and notebooks (djc/session.py). One worker; trainer.use_gpu picks its device.
    in_process: bool = False
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0.0)  # fractional on small machines, so Ray can co-schedule a driver
    # torch's intra-op threads in each worker; 0 = $DJC_THREADS_PER_WORKER, else 1 (2 workers share 2 cores). One
    # worker with 2 threads beats 2 workers of 1 on 2 cores when steps are small: it does no collectives.
    threads_per_worker: int = Field(0, ge=0)
    max_failures: int = Field(0, ge=0)  # worker-group restarts from the latest checkpoint before giving up
    checkpoint_every: int = Field(1, gt=0)  # epochs between checkpoints
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(20, gt=0)  # steps between host-synced loss logs
    # Autocast dtype of the backbone (heads, cluster statistics and losses stay float32): auto = bf16 on GPUs,
    # fp32 on CPUs (bf16 runs on a CPU too: tests/test_step.py).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # conv weights; auto = NHWC on GPUs and on CPUs with oneDNN (faster on both: step.nhwc)
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    compile: bool = False  # torch.compile the backbone: minutes of start-up, for long GPU runs
    ray_address: str = ""  # "" = join RAY_ADDRESS if set, else start a local Ray instance
    # Seconds between Ray Train's controller polls of the workers. Every ray.train.report waits for the next
    # poll: Ray's 2 s default cost 1.8 s per epoch (a 150-epoch digits job spent 4.5 min waiting); 0.1 s costs
    # 0.1 s. Raise it on clusters with hundreds of workers.
    poll_interval_s: float = Field(0.1, gt=0.0)
    ray_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"  # INFO shows Ray's per-report lines
    # A joined cluster without an autoscaler that lacks the workers' CPUs/GPUs: seconds to wait for nodes started
    # by hand to join before failing with what is missing (with an autoscaler the check is against its maximum).
    resource_wait_s: float = Field(120.0, ge=0.0)


class KnnMergeConfig(Node):
    """The knn-merge baseline (djc/methods/knn_merge.py): the learned features over-clustered by k-means and the
    pieces merged by average linkage of their kNN edges. Defaults measured on the shapes reference's features
    (docs/results.md): 10 pieces x 10 neighbours 0.449 against k-means 0.383; 5-20 pieces, 5-15 neighbours
    0.414-0.460."""

    # k-means pieces per cluster (0 = no knn-merge baseline); 4,096 pieces in all at most, and at least 4 rows a
    # piece: where that leaves no more pieces than K (K >= 4,096, or a tiny train split) the run reports none.
    pieces: int = Field(10, ge=0)
    neighbors: int = Field(10, gt=0)  # each row's nearest neighbours (cosine) that count as edges
    rows: int = Field(20_000, gt=0)  # neighbours are searched among a fixed sample of this many training rows


class EvalConfig(Node):
    baseline: bool = True  # also run k-means on raw pixels through the same evaluation
    knn_merge: KnnMergeConfig = KnnMergeConfig()  # the over-cluster-and-merge baseline on the learned features
    primary: str = "train"  # the split whose metrics head metrics.json
    # Split scored every epoch for model selection (djc tune, djc/selection.py): "train" or a data.eval name;
    # "" = none. Use a held-out split that training never reads (a `val` entry in data.eval).
    select_split: str = ""
    # Cluster galleries (plots/gallery_<split>_p<n>.png, djc/gallery.py): pages of the largest clusters per split
    # (0 = none); past them one page samples the remaining clusters over their size ranking. 4 x 50 covers K=200.
    gallery_pages: int = Field(4, ge=0)
    gallery_clusters: int = Field(50, gt=0)  # clusters (rows) per page: 50 rows of 32-64 px thumbnails ~1,800 px
    gallery_images: int = Field(8, gt=0)  # most confident and least confident images shown per cluster (each)
    # The 2-D map of the embeddings (plots/map_<split>.png, djc/embedmap.py): t-SNE (~10 s for 2,000 points on
    # one core), PCA (instant, less structure) or none.
    map: Literal["tsne", "pca", "none"] = "tsne"
    map_samples: int = Field(2000, gt=0)  # points per split on the map: a fixed random sample beyond this


class Config(Node):
    name: str = "run"  # run name (the run dir's default basename)
    seed: int = 0
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    optim: OptimConfig = OptimConfig()
    trainer: TrainerConfig = TrainerConfig()
    eval: EvalConfig = EvalConfig()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        if self.augment.crop_scale_min > self.augment.crop_scale_max:
            raise ValueError(f"augment.crop_scale_min ({self.augment.crop_scale_min}) is above augment.crop_scale_max "
                             f"({self.augment.crop_scale_max}): the crop's area scale is drawn from [min, max]")
        urls = {"data.train": self.data.train, "storage.endpoint_url": self.storage.endpoint_url,
                "model.weights": self.model.weights,
                "trainer.ray_address": self.trainer.ray_address,
                **{f"data.eval.{k}": v for k, v in self.data.eval.items()}}
        for key, url in urls.items():
            if has_credentials(url):
                raise ValueError(f"{key} holds credentials (user:secret@host); the config is printed and stored, "
                                 f"so give them through the environment or an AWS profile instead")
        w, b = self.trainer.num_workers, self.data.batch_size
        if self.trainer.in_process and w != 1:
            raise ValueError(f"trainer.in_process=true runs one process, but trainer.num_workers={w}: set "
                             f"trainer.num_workers=1 (`djc train --in-process` sets both)")
        if b % w:
            raise ValueError(f"data.batch_size={b} must be divisible by trainer.num_workers={w}")
        sel = self.eval.select_split
        if sel and sel != "train" and sel not in self.data.eval:
            raise ValueError(f"eval.select_split={sel!r} is neither 'train' nor a split of data.eval "
                             f"({', '.join(self.data.eval) or 'none'})")
        chosen = self.method.selected()
        if type(chosen).needs_k_le_batch and self.method.num_clusters > b:
            raise ValueError(
                f"method.num_clusters={self.method.num_clusters} is larger than the global batch "
                f"data.batch_size={b}; method {self.method.name} needs K <= batch"
            )
        chosen.check_run(self)
        return self


_Config = Config  # the tree as defined above, with the methods registered at import


def _rebuild() -> None:
    """A method (un)registered at run time (djc.methods.register): rebuild the `method` section and the tree
    around it, so that from_dict and load_config know it. Classes imported before keep the old sections."""
    global MethodConfig, Config
    MethodConfig = _method_config()
    Config = create_model("Config", __base__=_Config, __module__=__name__, method=(MethodConfig, MethodConfig()))


methods.on_change(_rebuild)


# ---------------------------------------------------------------------------------------------------------
# Loading: defaults <- YAML file <- dotted overrides, then one validation pass that names keys.


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _known_keys(ann, prefix + name + ".")
    return keys


def _format_error(err: ValidationError) -> str:
    known = _known_keys(Config)
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(key, known, n=1)
            lines.append(f"unknown config key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
        elif key:
            lines.append(f"{key}: {e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r})")
        else:  # cross-field checks already name their keys
            lines.append(e["msg"].removeprefix("Value error, "))
    if len(lines) == 1:  # the usual case: one line that names the key
        return f"invalid config: {lines[0]}"
    return "invalid config:\n  " + "\n  ".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot override '{dotted}': '{p}' is not a section")
        node = child
    node[leaf] = value


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        where = str(err).splitlines()[0]
        raise ConfigError(f"override '{item}': the value is not valid YAML ({where}); quote it, e.g. "
                          f"{key.strip()}='\"{raw}\"'") from None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=1 c=x` -> nested dict; values are parsed as YAML scalars (1 -> int, true -> bool, [1,2] -> list)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        _set_dotted(tree, *_parse_override(item))
    return tree


def with_values(tree: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of `tree` with each dotted key set to its value (djc tune's sampled values on a run config)."""
    tree = copy.deepcopy(tree)
    for key, value in values.items():
        _set_dotted(tree, key, value)
    return tree


def from_dict(tree: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then `key.sub=value` overrides."""
    return from_dict(load_tree(path, overrides))


def load_tree(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The YAML file's mapping with the overrides set, not validated: only what differs from the defaults."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        tree = loaded
    # Each override sets its key to its value, replacing what was there: `data.eval={}` clears the YAML's
    # eval splits instead of merging an empty mapping into them.
    tree = copy.deepcopy(tree)
    for item in overrides or []:
        _set_dotted(tree, *_parse_override(item))
    return tree


def to_dict(cfg: Config) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
