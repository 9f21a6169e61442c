"""AE-CM: an autoencoder with the clustering module on its code (Boubekki et al., Machine Learning 2021),
docs/methods/aecm.md.

Encoder d - 500 - 500 - 2000 - d_code (widths: method.aecm.hidden) and a mirrored decoder (LeakyReLU 0.2), the
CM (djc/methods/cm.py) on the code c. Per step, with n the GLOBAL batch and every sum over this worker's samples:
  joint     L = [sum_i |c_i - c~_i|^2 + sum_ik gamma_ik (1 - gamma_ik) + beta sum_i |x_i - x^_i|^2] / n_local
                + [lambda sum_kl |(U U^T - I)_kl| + E4(mean_i gamma_i)] / n
  CM alone  L = [E1 + E2 + E3](sg(c)) / n_local + E4 / n                      (init "pre", after k-means;
                                        E4 pairs alpha by size rank, or by cluster index: cm_alpha_order)
  pretrain  L = sum_i |x_i - x^_i|^2 / n_local                                 (init "pre", first epochs)
That is the paper's summed loss divided by n: the mean over workers of these local losses equals the one-process
loss, and E4 reads mean_i gamma_ik from a with-gradient all-reduce of the local sums (it sits inside a log).
The last epoch averages the weights after each of its steps; `on_train_end` swaps the average in.
With autoencoder=false there is no AE: the CM trains alone on the input from k-means at epoch 0, every epoch (the
module the paper shows equals a GMM, on features something else learned; djc's, docs/methods/aecm.md).
With model.weights the autoencoder's input x is not the pixels but the frozen backbone's features (model.freeze=all:
an autoencoder would make a trainable backbone's features trivial to reconstruct), computed once per run.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from djc import dist
from djc.methods.base import ClusteringMethod, EpochContext, MethodSettings, Prediction, Setup, StepOut, cluster_counts
from djc.methods.cm import CM, alpha_vector, cm_terms, dirichlet_prior, orthonormality, soft_distortion
from djc.methods import knn_merge
from djc.methods.kmeans import kmeans
from djc.methods.stage_optim import StageOptimizer
from djc.models.backbones import build_encoder

PRETRAIN, CM_ONLY, JOINT = 0, 1, 2


class AECMConfig(MethodSettings):
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
    # The partition the CM starts from: k-means on the codes (the paper's), or knn-merge on them (djc's: k-means
    # pieces merged by their kNN edges, at knn_merge.fit's defaults; U = each group's mean code), which on the final codes
    # of digits-LT runs read 0.759 against k-means' 0.688 and the CM's own 0.692 (docs/methods/aecm.md)
    cm_init_from: Literal["kmeans", "knn_merge"] = "kmeans"
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
    # Train the AE and the CM on an augmented view (the `augment` settings), rebuilding it as is; prediction and the
    # k-means init stay on the plain images. djc's extension, after DEC-DA (Guo et al. 2018): more distinct inputs
    # for a small data set (digits-LT, docs/methods/aecm.md); false = the paper's plain images
    augment: bool = False
    # false: no autoencoder, the CM alone on the input (code_dim, hidden, beta, lam, pretrain_epochs and cm_epochs
    # unused): k-means at epoch 0, then the CM-alone loss every epoch. djc's, for a frozen backbone's features,
    # which an autoencoder can only compress (on the RGB pretext it lost to k-means on them: docs/methods/aecm.md)
    autoencoder: bool = True

    @model_validator(mode="after")
    def _alpha_matches_mode(self) -> AECMConfig:
        is_list = isinstance(self.alpha, list)
        if is_list != (self.alpha_mode == "sorted"):
            raise ValueError(f"method.aecm.alpha={self.alpha!r} does not fit method.aecm.alpha_mode="
                             f"{self.alpha_mode!r}: 'sorted' takes a list, 'uniform' and 'profile' one number")
        if any(a <= 0 for a in (self.alpha if is_list else [self.alpha])):
            raise ValueError(f"method.aecm.alpha={self.alpha!r} must be > 0 (a Dirichlet parameter)")
        if not self.autoencoder and self.init != "pre":
            raise ValueError("method.aecm.autoencoder=false starts the CM from k-means: it needs method.aecm.init=pre "
                             f"(got {self.init!r})")
        if not self.autoencoder and self.augment:
            raise ValueError("method.aecm.autoencoder=false fits the CM to the plain input: method.aecm.augment "
                             "must be false")
        return self

    def check_run(self, cfg: Any) -> None:
        release_stages = self.pretrain_optimizer != "same" or self.fresh_optimizer or self.adam_eps_hat
        if cfg.optim.name != "adam" and release_stages:
            raise ValueError(f"method.aecm.pretrain_optimizer / fresh_optimizer / adam_eps_hat are the release's Adam "
                             f"stages: they need optim.name=adam (got {cfg.optim.name})")
        if cfg.model.weights and cfg.model.freeze != "all":
            raise ValueError(f"method aecm reconstructs the backbone's features: with model.weights it needs "
                             f"model.freeze=all (got {cfg.model.freeze}), or a trainable backbone makes them trivial")

class AECMUpdate(NamedTuple):
    """A step's state update, the same on every worker."""

    counts: Tensor  # (K,) int64 argmax counts of the global batch, all-reduced (with gamma's sums) in forward




def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with LeakyReLU(0.2) between them, none after the last (the code and the output are linear)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(0.2))
    return nn.Sequential(*layers)


def copy_vector_(vec: Tensor, params: list[nn.Parameter]) -> None:
    """In place, unlike torch's vector_to_parameters (which makes the parameters views of `vec`)."""
    offset = 0
    for p in params:
        p.data.copy_(vec[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def stage_at(epoch: int, init: str, pretrain_epochs: int, cm_epochs: int) -> int:
    if init == "rand" or epoch >= pretrain_epochs + cm_epochs:
        return JOINT
    return PRETRAIN if epoch < pretrain_epochs else CM_ONLY


class AECM(ClusteringMethod):
    augmented = False  # an autoencoder reconstructs the non-augmented input

    @classmethod
    def takes_augmented(cls, settings: MethodSettings) -> bool:
        return settings.augment

    def __init__(self, c: AECMConfig, s: Setup):
        super().__init__()
        self.c, self.k, self.seed, self.km = c, s.num_clusters, s.seed, s.kmeans
        self.augmented = c.augment  # augment: the loop hands two augmented views; the step reads view 1
        self.batch = s.global_batch  # converts the release's pretraining lr (make_optimizer)
        if c.autoencoder and c.init == "pre" and s.epochs <= c.pretrain_epochs + c.cm_epochs:
            raise ValueError(f"optim.epochs={s.epochs} leaves no joint epoch after method.aecm.pretrain_epochs="
                             f"{c.pretrain_epochs} + method.aecm.cm_epochs={c.cm_epochs}")
        h, w, ch = s.image_shape
        if s.model.weights:  # the frozen backbone's features are the input (module docstring)
            bb = build_encoder(s.model, s.image_shape)
            self.backbone, d = bb.net, bb.feat_dim
        else:
            d = h * w * ch
        self.d = d
        # (pretrain, CM-alone) epochs: without an AE none of the first and all of the second, k-means at epoch 0
        self.stages = (c.pretrain_epochs, c.cm_epochs) if c.autoencoder else (0, s.epochs)
        if c.autoencoder:
            self.encoder, self.decoder = mlp([d, *c.hidden, c.code_dim]), mlp([c.code_dim, *reversed(c.hidden), d])
        else:  # the code is the input, reconstructed exactly: recon = 0 and the CM-alone stage throughout
            self.encoder, self.decoder = nn.Identity(), nn.Identity()
        self.cm = CM(c.code_dim if c.autoencoder else d, self.k)
        alpha = alpha_vector(c.alpha if isinstance(c.alpha, float) else list(c.alpha), self.k, c.alpha_mode,
                             c.expected_imbalance)
        self.register_buffer("alpha", alpha)  # (K,) ascending
        # (stage, averaging): set at each epoch start; a buffer so that a checkpoint restores it.
        self.register_buffer("phase", torch.tensor([stage_at(0, c.init, *self.stages), 0]))
        self.register_buffer("hist", torch.zeros(self.k, dtype=torch.long))  # this epoch's global argmax counts
        numel = sum(p.numel() for p in self._own())
        self.register_buffer("avg_sum", torch.zeros(numel))  # sum of the weight vector after each averaged step
        self.register_buffer("avg_count", torch.zeros((), dtype=torch.long))
        self._phase: tuple[int, int] | None = None  # host copy of `phase`: no device sync per step
        self._frozen: Tensor | None = None  # the AE's weights while the CM trains alone
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_phase", None))

    def _stage(self) -> tuple[int, int]:
        if self._phase is None:
            s, a = self.phase.tolist()
            self._phase = (int(s), int(a))
        return self._phase

    def _own(self) -> list[nn.Parameter]:
        """The autoencoder's and the CM's parameters: everything but a (frozen) backbone."""
        return [*self.encoder.parameters(), *self.decoder.parameters(), *self.cm.parameters()]

    def _input(self, x: Tensor) -> Tensor:
        """(B, d): the pixels, or the frozen backbone's features of them."""
        return self.encode(x) if hasattr(self, "backbone") else x.flatten(1)

    def forward(self, index: Tensor, x1: Tensor, x2: Tensor) -> StepOut:
        stage, _ = self._stage()
        x = self._input(x1)  # x2 is the same plain view, or with augment another augmentation (unused)
        b, k = x.shape[0], self.k
        code = self.encoder(x)
        recon = (x - self.decoder(code)).pow(2).sum()
        c_in = code.detach() if stage == CM_ONLY else code
        gamma = self.cm(c_in)  # (b, K)
        with torch.no_grad():
            counts = cluster_counts(gamma.argmax(1), k).to(gamma.dtype)
        # One collective, with gradient: [sum_i gamma_i (K), n_local, argmax counts (K, no grad)].
        glob = dist.all_reduce_sum_with_grad(torch.cat([gamma.sum(0), gamma.new_full((1,), b), counts]))
        n = glob[k].detach()
        e4 = dirichlet_prior(glob[:k] / n, self.alpha, sort=stage != CM_ONLY or self.c.cm_alpha_order == "sorted")
        u = self.cm.u
        zero = code.new_zeros(())
        if stage == JOINT:
            e1 = (code - gamma @ u).pow(2).sum()
            e2 = (gamma * (1 - gamma)).sum()  # |u_k| = 1 under the orthonormality penalty
            e3, orth = zero, orthonormality(u)
        else:
            e1, e2, e3 = cm_terms(c_in, gamma, u)
            orth = zero
        logs = {"recon": recon / b, "e1": e1 / b, "e2": e2 / b, "e3": e3 / b, "orth": orth / n, "prior": e4 / n}
        if stage == PRETRAIN:
            loss = logs["recon"]
        elif stage == CM_ONLY:
            loss = logs["e1"] + logs["e2"] + logs["e3"] + logs["prior"]
        else:
            loss = logs["e1"] + logs["e2"] + self.c.beta * logs["recon"] + self.c.lam * logs["orth"] + logs["prior"]
        # Every parameter takes part (with a zero gradient in the staged phases) so that DDP's reducer sees all.
        loss = loss + 0.0 * sum(p.sum() for p in self._own())
        update = AECMUpdate(glob[k + 1 :].detach().round().long())
        return StepOut(loss, {name: v.detach() for name, v in logs.items()}, update)

    def _autoencoder(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters()) + list(self.decoder.parameters())

    @torch.no_grad()
    def update_state(self, update: AECMUpdate) -> None:
        self.hist.add_(update.counts)
        if self._frozen is not None:
            # CM alone: the AE's gradient is 0, but Adam's momentum from pretraining would keep moving it (on
            # digits, <1e-3 per weight over ~20 steps took the reconstruction error from 1.2 to 21): put it back.
            copy_vector_(self._frozen, self._autoencoder())
        if self._stage()[1]:
            self.avg_sum.add_(torch.nn.utils.parameters_to_vector(self._own()))
            self.avg_count.add_(1)

    @torch.no_grad()
    def on_epoch_start(self, ctx: EpochContext) -> None:
        c = self.c
        stage = stage_at(ctx.epoch, c.init, *self.stages)
        averaging = int(c.average_last_epoch and ctx.epoch == ctx.epochs - 1)
        if c.init == "pre" and ctx.epoch == self.stages[0]:
            self._init_cm(ctx)
        self.phase.copy_(torch.tensor([stage, averaging]))
        self._phase = (stage, averaging)
        # Not a buffer: restored after every step, the AE at each CM-alone epoch start IS the snapshot (resume too).
        self._frozen = (torch.nn.utils.parameters_to_vector(self._autoencoder()).clone()
                        if stage == CM_ONLY and c.autoencoder else None)
        self.hist.zero_()
        if averaging:
            self.avg_sum.zero_()
            self.avg_count.zero_()

    @torch.no_grad()
    def _init_cm(self, ctx: EpochContext) -> None:
        """k-means on the codes of the whole training set (sharded), U = centers, V = pinv(U) (or the GMM posterior)."""
        codes, index = ctx.map_train(lambda x, i: self.encoder(self._input(x)))
        if self.c.cm_init_from == "knn_merge":
            centers, inertia = self._knn_merge_centers(codes, index)
        else:
            km = kmeans(codes, self.k, iters=self.km.iters, restarts=self.km.restarts, seed=self.seed, index=index)
            centers, inertia = km.centers, km.inertia
        var = None  # pinv
        if self.c.cm_init == "posterior":  # the per-dimension variance around the centers, over every worker
            var = inertia / float(dist.all_reduce_sum(codes.new_tensor([codes.numel()])).item())
        self.cm.init_from_centers(centers, var)
        for p in self.cm.parameters():  # pinv on rank 0's numbers everywhere: identical by construction
            dist.broadcast_(p.data)

    def _knn_merge_centers(self, codes: Tensor, index: Tensor) -> tuple[Tensor, float]:
        """(K, d) mean code of each knn-merge group and the global inertia around them, the same on every worker
        (the groups are; the per-group sums are all-reduced in one call)."""
        groups = knn_merge.fit(codes, index, self.k, iters=self.km.iters, restarts=self.km.restarts,
                               seed=self.seed).predict(codes)
        # In float64: the sums of 1 worker and the all-reduced sums of 2 then round to the same float32 centers.
        x = codes.double()
        onehot = torch.nn.functional.one_hot(groups, self.k).double()  # (n, K)
        sums = dist.all_reduce_sum(torch.cat([onehot.sum(0)[:, None], onehot.T @ x], dim=1))
        centers = sums[:, 1:] / sums[:, :1].clamp_min(1.0)
        inertia = dist.all_reduce_sum((x - centers[groups]).pow(2).sum().reshape(1))
        return centers.to(codes.dtype), float(inertia.item())

    @torch.no_grad()
    def on_train_end(self) -> None:
        if int(self.avg_count) > 0:
            copy_vector_(self.avg_sum / self.avg_count, self._own())

    def param_groups(self) -> list[dict]:
        # The paper's Adam (eps rescaled to our per-sample loss) at a constant lr: a cosine schedule would make the
        # averaging epoch's steps vanish.
        return [{"params": self._own(), "eps": self.c.adam_eps, "fixed_lr": self.c.constant_lr}]

    def make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer | None:
        """The release's optimisers when any of its settings is on (djc/methods/stage_optim.py), else optim.name's.

        The release's pretraining loss is sum_i mean_d (x - x^)^2, djc's sum_i |x_i - x^_i|^2 / n: the same SGD
        step takes lr x n / d on djc's loss (1e-2 x 256 / 784 = 3.3e-3 for the release's MNIST batch of 256)."""
        c = self.c
        if c.pretrain_optimizer == "same" and not c.fresh_optimizer and not c.adam_eps_hat:
            return None
        return StageOptimizer(groups, lambda: self._stage()[0], lr=groups[0]["lr"], eps=c.adam_eps,
                              eps_hat=c.adam_eps_hat, fresh=c.fresh_optimizer,
                              sgd_stage=PRETRAIN if c.pretrain_optimizer == "sgd" else None,
                              sgd_lr=c.pretrain_lr * self.batch / self.d, sgd_momentum=c.pretrain_momentum)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        code = self.encoder(self._input(x))
        gamma = self.cm(code)
        conf, y = gamma.max(dim=1)
        # OOD score: the sample's soft distortion sum_k gamma_k |c - u_k|^2, its negative log-likelihood up to
        # constants under the isotropic mixture the CM fits.
        return Prediction(y.unsqueeze(1), conf, code, soft_distortion(code, gamma, self.cm.u))

    def health_counts(self) -> Tensor:
        return self.hist
