"""The typed config tree: defaults are the recommended values, YAML overrides what differs.

A run config (jobs/*.yaml) holds only the keys that differ from these defaults; `key.sub=value` on the command
line overrides both. Unknown keys and impossible values are refused with a message that names the key, before
any worker starts. The config is frozen after parsing: derived quantities are computed where they are used.
"""

from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator


NEEDS_K_LE_BATCH = {"secu", "dcl", "p2ot"}


def has_credentials(url: str) -> bool:
    """Whether a URL carries user:secret@ in its authority (s3://KEY:SECRET@bucket, http://u:p@host)."""
    scheme, sep, rest = url.partition("://")
    return bool(sep) and "@" in rest.split("/", 1)[0]


class ConfigError(ValueError):
    """A config that cannot run; the message names the offending key."""


def _numeric(annotation: Any) -> bool:
    """Whether a field takes numbers and not booleans (int, float, float | "auto", list[float] | float, ...)."""
    args = typing.get_args(annotation)
    if args:
        return bool not in args and any(_numeric(a) for a in args)
    return annotation in (int, float)


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1 for an int field: `optim.epochs=true` would train one epoch.
        if isinstance(value, bool) and _numeric(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a number, got a boolean")
        return value


class DataConfig(_Node):
    train: str = "runs/data/digits_lt10/train"  # dataset URL (path, file://, s3://, memory://) trained on
    eval: dict[str, str] = Field(default_factory=dict)  # extra splits evaluated at the end: name -> URL
    # If `train` (or an eval URL) holds no dataset yet, make it from this source on first use ("" = never).
    source: Literal["", "digits", "cifar10", "cifar100", "folder"] = ""
    source_root: str = ""  # where cifar/folder sources live (ignored for digits)
    imbalance_ratio: float = Field(1.0, ge=1.0)  # long-tail ratio for the prepared train split (1 = balanced)
    profile: Literal["exp", "step"] = "exp"  # long-tail profile (docs/data.md)
    prepare_seed: int = 0  # seed of the train/test split and of the long-tail subset
    batch_size: int = Field(128, gt=0)  # GLOBAL batch over all workers; each worker takes batch_size / workers
    loader_workers: int = Field(0, ge=0)  # DataLoader processes per training worker (0 = decode in-process)
    window: int = Field(16, gt=0)  # row groups shuffled together; larger = better mixing, more memory
    # skip = drop undecodable images and count them; each step then trains on the smallest local batch of the
    # step over workers (one small all-reduce per step), and evaluation leaves them out of the outputs
    on_corrupt: Literal["error", "skip"] = "error"
    cache_dir: str = ""  # local disk cache of remote shards for later epochs ("" = off)
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


class StorageConfig(_Node):
    """Where object storage is and who we are there. Names only: credentials come from the environment,
    an AWS profile or an instance role, never from here, because this config is printed and stored."""

    endpoint_url: str = ""  # S3-compatible endpoint (http://127.0.0.1:9000); "" = AWS_ENDPOINT_URL or AWS itself
    region: str = ""  # "" = AWS_REGION / AWS_DEFAULT_REGION / the profile's region
    profile: str = ""  # a named profile of ~/.aws/{config,credentials}; "" = AWS_PROFILE or the default chain


class AugmentConfig(_Node):
    crop_scale_min: float = Field(0.3, gt=0.0, le=1.0)  # RandomResizedCrop lower scale (0.2 CIFAR-100, 0.08 ImageNet)
    hflip: bool = True  # off for digits and text: a mirrored 2 is not a 2
    strength: float = Field(1.0, ge=0.0)  # multiplies the colour-jitter amplitudes; 0 disables jitter
    degrees: float = Field(0.0, ge=0.0, le=180.0)  # random rotation ~ U(-d, d), both views; 0 = none (SeCu)
    out_size: int = Field(0, ge=0)  # crop output side; 0 = the dataset's image side


class ModelConfig(_Node):
    backbone: Literal["smallconv", "resnet18_cifar", "resnet50", "mlp"] = "smallconv"
    width: int = Field(64, gt=0)  # channels of the small convnet / hidden units of the MLP
    proj_hidden: int = Field(512, gt=0)  # hidden units of the projection head
    proj_dim: int = Field(128, gt=0)  # D, the normalised feature dimension the clustering heads see


class SeCuConfig(_Node):
    num_heads: int = Field(10, gt=0)  # head h has K * (h + 1) clusters; head 0 is evaluated
    constraint: Literal["size", "entropy"] = "size"
    # Lower bound of every cluster's share, as a fraction of N/K. "auto" derives it from expected_imbalance:
    # the smallest class share of an exponential profile, so long-tailed data can satisfy it (docs/methods/secu.md).
    gamma: float | Literal["auto"] = 0.9
    expected_imbalance: float = Field(1.0, ge=1.0)  # for the "auto" settings: expected largest/smallest class ratio
    eta: float = Field(0.1, gt=0.0)  # dual step size of the size constraint
    # Clamp of the size duals at 0: "below_one" only when gamma < 1 (the release; at gamma = 1 the duals keep a
    # zero sum), "always" at every gamma (djc before; differs only at gamma = 1, e.g. gamma=auto at ratio 1)
    dual_clamp: Literal["below_one", "always"] = "below_one"
    # Sizes the entropy constraint pulls towards: uniform = SeCu's -H(p) (equal sizes); profile = KL(p || pi),
    # pi an exponential profile at expected_imbalance matched to the clusters by size rank (docs/methods/secu.md)
    size_prior: Literal["uniform", "profile"] = "uniform"
    alpha: float = Field(6000.0, ge=0.0)  # weight of the entropy constraint (constraint=entropy)
    # What the entropy constraint's shares p_k = n_k / norm divide by: "dataset" = N (djc); "counted" = the
    # instances counted so far (+1 for a new one), the release's rule. They differ in epoch 0 only; counted read
    # 0.745 against 0.783 on digits-LT (3 seeds, noise; docs/methods/secu.md)
    share_norm: Literal["dataset", "counted"] = "dataset"
    t_x: float = Field(0.05, gt=0.0)  # temperature of the representation loss
    t_w: float = Field(0.05, gt=0.0)  # temperature of the center loss
    tau: float = Field(0.2, ge=0.0, le=1.0)  # weight of the previous label in the representation target
    center_lr: float = Field(1.2, gt=0.0)  # constant lr of the centers (0.8 on CIFAR-100-20)
    center_wd: float = Field(0.0, ge=0.0)
    # Batch norm over the two views: "joint" = one encoder pass over both (statistics over 2B images, djc);
    # "separate" = one pass per view (the release; 0.764 against 0.783 on digits-LT, 3 seeds, noise). Only models
    # with batch norm see a difference.
    bn_views: Literal["joint", "separate"] = "joint"
    # The evaluated clustering (predict's column 0). "head": head 0's argmax, SeCu's rule. "merge": head
    # `merge_head`'s K (merge_head + 1) clusters merged to K by average linkage on their centers: on long-tailed
    # data the balanced head 0 splits big classes and merges small ones, while an over-clustered head gives
    # small classes clusters of their own that the merge keeps (docs/methods/secu.md, "SeCu on long-tailed data")
    predict: Literal["head", "merge"] = "head"
    merge_head: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _merge_head_exists(self) -> SeCuConfig:
        if self.predict == "merge" and self.merge_head >= self.num_heads:
            raise ValueError(f"method.secu.merge_head={self.merge_head} needs method.secu.num_heads > "
                             f"{self.merge_head} (got {self.num_heads}): heads are numbered from 0")
        return self


class DCLConfig(_Node):
    """Debiased contrastive clustering (docs/methods/dcl.md). The DCL release trains with Adam lr 1e-3,
    wd 1e-6 (set optim.name=adam in the job)."""

    temperature: float = Field(0.5, gt=0.0)  # t of the debiased contrastive loss; lower (0.2) for sharper features
    # "cluster": tau+ per anchor = its cluster's share n_c / N (long-tailed data); "global": one tau_plus for all
    tau_plus_mode: Literal["cluster", "global"] = "cluster"
    tau_plus: float = Field(0.1, ge=0.0, lt=1.0)  # global tau+ (and the first step's in cluster mode): ~1 / classes
    tau_max: float = Field(0.3, ge=0.0, lt=1.0)  # cap of the per-anchor tau+; a head cluster above it is cut here
    # cluster mode: n_c divided by the instances counted so far ("counted") or by N ("dataset": a smaller tau+
    # until every instance has been seen once; the same after the first epoch)
    tau_plus_share: Literal["counted", "dataset"] = "counted"
    # Batch norm over the two views: one encoder pass over both ("joint", djc) or one pass per view ("separate",
    # Chuang et al.'s release: net(pos_1), net(pos_2))
    bn_views: Literal["joint", "separate"] = "joint"
    lam: float = Field(1.0, ge=0.0)  # weight of DDC's divergence loss; 0 = contrastive learning only
    cluster_hidden: int = Field(100, gt=0)  # hidden units h of the cluster head (DDC's 100)
    sigma_frac: float = Field(0.15, gt=0.0)  # kernel sigma^2 as a fraction of the median squared distance (DDC)


class StatDECConfig(_Node):
    """StatDEC (djc's own design, docs/methods/statdec.md)."""

    temperature: float = Field(0.5, gt=0.0)  # t of the contrastive loss; lower (0.2) for sharper features
    tau_max: float = Field(0.3, ge=0.0, lt=1.0)  # cap of tau+ = prior of the anchor's cluster; 0 = plain NT-Xent
    lam: float = Field(1.0, ge=0.0)  # weight of KL(P || Q); 0 = clustering on fixed contrastive features
    # EMA of the pooled cluster statistics per step: ~1/(1-ema) = 10 steps of samples; raise (0.99) when a tail
    # cluster sees fewer than ~10 samples in that many steps (ImageNet-LT: 5 images in 115k)
    ema: float = Field(0.9, ge=0.0, lt=1.0)
    nu: float = Field(1.0, ge=0.0)  # Student-t degrees of freedom of the kernel; 0 = Gaussian (lighter tails)
    sharpen: float = Field(2.0, ge=1.0)  # power s of the likelihood in the target p ~ pi l^s (DEC's 2)
    # cardinality: p ~ pi l^s keeps the data's cluster sizes; balanced: DEC's p ~ q^2 / f (ablation only)
    target: Literal["cardinality", "balanced"] = "cardinality"
    assign: Literal["soft", "hard"] = "soft"  # statistics pooled with the target P, or with its argmax
    var_floor: float = Field(1e-4, gt=0.0)  # least per-dimension variance: raise if a cluster collapses to a point
    warmup_frac: float = Field(0.2, ge=0.0, le=1.0)  # share of epochs of contrastive-only training before init
    init_over: int = Field(3, ge=1)  # k-means with init_over * K centers, merged to K (1 = plain k-means)
    # Merges of the init's pieces tried; the one under which the data are most likely wins (docs/methods/statdec.md)
    init_merges: list[Literal["bhattacharyya", "ward", "average"]] = Field(
        default_factory=lambda: ["bhattacharyya", "ward"], min_length=1)
    # T of the tempered kernel log l / T: at D = 128 the density's log-odds between clusters are ~40 nats, so Q is
    # one-hot, P = Q and KL has no gradient; T ~ D / 4 makes them O(1) (docs/methods/statdec.md)
    kernel_temperature: float = Field(1.0, gt=0.0)


class AECMConfig(_Node):
    """AE-CM (docs/methods/aecm.md)."""

    code_dim: int = Field(10, gt=0)  # autoencoder code size d_code (10 on MNIST); raise for richer images
    hidden: list[int] = Field(default_factory=lambda: [500, 500, 2000])  # encoder widths (decoder mirrors); 8x8: less
    beta: float = Field(5.0, ge=0.0)  # weight of the input reconstruction (5 on MNIST); lower if clusters stay mixed
    lam: float = Field(1.0, ge=0.0)  # weight of the centroid orthonormality penalty sum |U U^T - I|
    # Dirichlet prior: 230 at a global batch of 500 on MNIST (alpha - 1 = 0.46 x batch); scale alpha - 1 with the
    # batch. A list (alpha_mode: sorted) gives one value per cluster, matched to clusters by size.
    alpha: float | list[float] = 230.0
    # uniform: alpha for all (pushes to equal sizes); sorted: the list; profile: 1 + (alpha - 1) K s_k with s an
    # exponential profile of ratio expected_imbalance (long-tailed data).
    alpha_mode: Literal["uniform", "sorted", "profile"] = "uniform"
    expected_imbalance: float = Field(1.0, ge=1.0)  # alpha_mode=profile: expected largest / smallest class ratio
    init: Literal["pre", "rand"] = "pre"  # pre: pretrain AE, k-means on codes, CM alone, then joint; rand: joint only
    pretrain_epochs: int = Field(100, ge=0)  # init=pre: autoencoder-only epochs (reconstruction)
    cm_epochs: int = Field(100, ge=0)  # init=pre: CM-only epochs on the frozen codes after k-means
    # init=pre, V and b after k-means: posterior = the isotropic-GMM posterior at the k-means solution (V = U / s2,
    # b_k = -|u_k|^2 / (2 s2), s2 = inertia per dimension), sharp from step 1; pinv = the paper's V = pinv(U), b = 0,
    # whose near-uniform gamma lost 24 ACC points in the CM-alone stage on digits-LT (docs/methods/aecm.md).
    cm_init: Literal["posterior", "pinv"] = "posterior"
    average_last_epoch: bool = True  # final weights = mean over the last epoch's steps (the paper's averaging epoch)
    adam_eps: float = Field(2e-6, gt=0.0)  # the paper's 1e-3 on a loss summed over 500 samples = 2e-6 on our mean
    constant_lr: bool = True  # the paper's constant lr; false = the optim schedule (starves the averaging epoch)
    # CM-alone stage (init=pre): alpha matched to the clusters by size rank, as in the joint stage ("sorted", djc),
    # or alpha_k to cluster k ("index", the release). The same for a uniform alpha; differs for profile / sorted.
    cm_alpha_order: Literal["sorted", "index"] = "sorted"
    # The release's optimisers (pretrain_optimizer=sgd, fresh_optimizer or adam_eps_hat: djc/methods/stage_optim.py;
    # they need optim.name=adam). "sgd" pretrains the AE with SGD at pretrain_lr, pretrain_momentum (the release's
    # MNIST 1e-2, 0.9, on its loss sum_i mean_d (x - x^)^2; djc converts the lr to its own loss); "same" = Adam
    pretrain_optimizer: Literal["same", "sgd"] = "same"
    pretrain_lr: float = Field(0.01, gt=0.0)  # pretrain_optimizer=sgd: the release's lr (MNIST 1e-2, CIFAR-10 1e-3)
    pretrain_momentum: float = Field(0.9, ge=0.0, lt=1.0)  # pretrain_optimizer=sgd: the release's momentum
    fresh_optimizer: bool = False  # true: each stage starts a new optimiser (zero moments), as the release does
    adam_eps_hat: bool = False  # true: adam_eps is added before Adam's bias correction (TensorFlow's, the release's)

    @model_validator(mode="after")
    def _alpha_matches_mode(self) -> AECMConfig:
        is_list = isinstance(self.alpha, list)
        if is_list != (self.alpha_mode == "sorted"):
            raise ValueError(f"method.aecm.alpha={self.alpha!r} does not fit method.aecm.alpha_mode="
                             f"{self.alpha_mode!r}: 'sorted' takes a list, 'uniform' and 'profile' one number")
        if any(a <= 0 for a in (self.alpha if is_list else [self.alpha])):
            raise ValueError(f"method.aecm.alpha={self.alpha!r} must be > 0 (a Dirichlet parameter)")
        return self


class P2OTConfig(_Node):
    """P2OT (docs/methods/p2ot.md)."""

    eps: float = Field(0.1, gt=0.0)  # entropic regularisation of the transport plan
    lam: float = Field(1.0, gt=0.0)  # KL weight on the cluster marginal: larger = more balanced (1e6 ~ balanced OT)
    rho0: float = Field(0.1, gt=0.0, le=1.0)  # mass transported at step 0; lower = start from fewer, surer samples
    rho1: float = Field(1.0, gt=0.0, le=1.0)  # mass transported at the last step: rho0 + (rho1 - rho0) e^(-5 (1-t/T)^2)
    bank_batches: int = Field(10, gt=0)  # logits bank, in global batches, that the plan is solved on
    sinkhorn_iters: int = Field(1000, gt=0)  # cap on scaling iterations (warm-started solves converge in far fewer)
    sinkhorn_tol: float = Field(1e-6, gt=0.0)  # relative change of the column scalings that counts as converged
    weight_by_mass: bool = True  # targets keep each sample's transported mass; false = renormalise every row to 1
    # The cluster head: "mlp" = Linear-BN-ReLU-Linear on the features (model.proj_hidden), unbounded logits (djc);
    # "cosine" = the release's cosine classifier, logit_scale * cos(features, v_k), so |logit| <= logit_scale
    head: Literal["mlp", "cosine"] = "mlp"
    logit_scale: float = Field(10.0, gt=0.0)  # head=cosine: the logits' bound (the release's 10)
    # Epochs whose plan is solved on the current global batch alone, without the bank (the release: 1, its bank
    # starts at epoch 1); the bank is still written, so it is full when it starts
    batch_only_epochs: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _rho_grows(self) -> P2OTConfig:
        if self.rho0 > self.rho1:
            raise ValueError(f"method.p2ot.rho0={self.rho0} must not exceed method.p2ot.rho1={self.rho1}")
        return self


class KMeansConfig(_Node):
    iters: int = Field(50, gt=0)  # Lloyd iterations of the baseline
    restarts: int = Field(3, gt=0)  # k-means++ restarts; the lowest inertia wins


class MethodConfig(_Node):
    name: Literal["secu", "dcl", "statdec", "aecm", "p2ot"] = "secu"
    num_clusters: int = Field(10, gt=1)  # K of the evaluated head (the number of classes when known)
    secu: SeCuConfig = SeCuConfig()
    dcl: DCLConfig = DCLConfig()
    statdec: StatDECConfig = StatDECConfig()
    aecm: AECMConfig = AECMConfig()
    p2ot: P2OTConfig = P2OTConfig()
    kmeans: KMeansConfig = KMeansConfig()


class OptimConfig(_Node):
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.2, ge=0.0)  # encoder lr at the global batch of 128; scaled linearly with batch size
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    epochs: int = Field(400, gt=0)
    frozen_epochs: int = Field(1, ge=0)  # encoder lr 0 while the centers settle (SeCu: epoch 0)
    warmup_epochs: int = Field(10, ge=0)  # linear warm-up after the frozen epochs, then cosine to 0


class TrainerConfig(_Node):
    num_workers: int = Field(2, gt=0)  # Ray Train workers (one process each)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0.0)  # fractional on small machines, so Ray can co-schedule a driver
    max_failures: int = Field(0, ge=0)  # worker-group restarts from the latest checkpoint before giving up
    checkpoint_every: int = Field(1, gt=0)  # epochs between checkpoints
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(20, gt=0)  # steps between host-synced loss logs
    # Autocast dtype of the backbone (heads, cluster statistics and losses stay float32): auto = bf16 on GPUs,
    # fp32 on CPUs (bf16 runs on a CPU too: tests/test_engine.py).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"  # conv weights; auto = NHWC on GPUs
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


class EvalConfig(_Node):
    baseline: bool = True  # also run k-means on raw pixels through the same evaluation
    primary: str = "train"  # the split whose metrics head metrics.json
    # Split scored every epoch for model selection (djc tune, djc/evaluate.py): "train" or a data.eval name;
    # "" = none. Use a held-out split that training never reads (a `val` entry in data.eval).
    select_split: str = ""


class Config(_Node):
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
        urls = {"data.train": self.data.train, "storage.endpoint_url": self.storage.endpoint_url,
                "trainer.ray_address": self.trainer.ray_address,
                **{f"data.eval.{k}": v for k, v in self.data.eval.items()}}
        for key, url in urls.items():
            if has_credentials(url):
                raise ValueError(f"{key} holds credentials (user:secret@host); the config is printed and stored, "
                                 f"so give them through the environment or an AWS profile instead")
        w, b = self.trainer.num_workers, self.data.batch_size
        if b % w:
            raise ValueError(f"data.batch_size={b} must be divisible by trainer.num_workers={w}")
        sel = self.eval.select_split
        if sel and sel != "train" and sel not in self.data.eval:
            raise ValueError(f"eval.select_split={sel!r} is neither 'train' nor a split of data.eval "
                             f"({', '.join(self.data.eval) or 'none'})")
        if self.method.secu.gamma != "auto" and not 0.0 <= self.method.secu.gamma <= 1.0:
            raise ValueError(f"method.secu.gamma={self.method.secu.gamma} must lie in [0, 1] or be 'auto'")
        a = self.method.aecm
        if self.method.name == "aecm" and self.optim.name != "adam" and (
                a.pretrain_optimizer != "same" or a.fresh_optimizer or a.adam_eps_hat):
            raise ValueError(f"method.aecm.pretrain_optimizer / fresh_optimizer / adam_eps_hat are the release's Adam "
                             f"stages: they need optim.name=adam (got {self.optim.name})")
        secu = self.method.secu
        if secu.size_prior != "uniform" and secu.constraint != "entropy":
            raise ValueError(f"method.secu.size_prior={secu.size_prior} shapes the entropy constraint; it needs "
                             f"method.secu.constraint=entropy (got {secu.constraint})")
        # SeCu's size duals compare per-step counts with gamma * B / K, DDC's divergence and P2OT's plan need
        # every cluster to be reachable in one batch: a K above the global batch can never be filled.
        if self.method.name in NEEDS_K_LE_BATCH and self.method.num_clusters > b:
            raise ValueError(
                f"method.num_clusters={self.method.num_clusters} is larger than the global batch "
                f"data.batch_size={b}; method {self.method.name} needs K <= batch"
            )
        return self


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
