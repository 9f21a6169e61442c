"""The plain loops `djc bench throughput` times djc's step against: SeCu as research code writes it (the same
work), and each method's network trained without its cluster side."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from djc.config import Config
from djc.methods import aecm
from djc.methods.secu_losses import auto_gamma, center_loss, dual_step, representation_loss
from djc.models.backbones import resnet
from djc.step import amp_dtype, nhwc


class Reference(nn.Module):
    """SeCu's training step as a plain loop would write it (size constraint, the config's hyper-parameters)."""

    def __init__(self, cfg: Config, backbone: str, channels: int, device: torch.device):
        super().__init__()
        c, d, k = cfg.method.secu, cfg.model.proj_dim, cfg.method.num_clusters
        self.c, self.amp = c, amp_dtype(cfg.trainer.precision, device)
        self.gammas = [c.gamma if c.gamma != "auto" else auto_gamma(k * (h + 1), c.expected_imbalance)
                       for h in range(c.num_heads)]
        self.backbone = resnet(18 if backbone == "resnet18_cifar" else 50, channels, backbone == "resnet18_cifar").net
        feat = 512 if backbone == "resnet18_cifar" else 2048
        self.proj = nn.Sequential(nn.Linear(feat, cfg.model.proj_hidden), nn.BatchNorm1d(cfg.model.proj_hidden),
                                  nn.ReLU(inplace=True), nn.Linear(cfg.model.proj_hidden, d))
        self.centers = nn.ParameterList(nn.Parameter(F.normalize(torch.randn(d, k * (h + 1)), dim=0))
                                        for h in range(c.num_heads))
        self.w_prev = [w.detach().clone() for w in self.centers]
        self.rho = [torch.zeros(w.shape[1]) for w in self.centers]
        self.hist = [torch.zeros(w.shape[1], dtype=torch.long) for w in self.centers]
        self.memory: list[Tensor] = []
        self.to(device)
        if nhwc(cfg.trainer.memory_format, device):
            self.backbone.to(memory_format=torch.channels_last)
        self.w_prev, self.rho, self.hist = ([t.to(device) for t in ts] for ts in (self.w_prev, self.rho, self.hist))
        groups = [{"params": [*self.backbone.parameters(), *self.proj.parameters()]},
                  {"params": list(self.centers), "lr": c.center_lr, "weight_decay": c.center_wd}]
        self.opt = torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                   weight_decay=cfg.optim.weight_decay)

    def step(self, index: Tensor, x1: Tensor, x2: Tensor, num_samples: int) -> Tensor:
        if not self.memory:
            self.memory = [torch.full((num_samples,), -1, dtype=torch.long, device=x1.device) for _ in self.centers]
        b, c = x1.shape[0], self.c
        with torch.autocast(x1.device.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None):
            f = self.backbone(torch.cat([x1, x2]))
        f = F.normalize(self.proj(f.float()), dim=1)
        f1, f2 = f[:b], f[b:]
        loss, labels = f.new_zeros(()), []
        for h, weight in enumerate(self.centers):
            w = F.normalize(weight, dim=0)
            with torch.no_grad():
                y = (0.5 * (f1 + f2) @ w + self.rho[h]).argmax(dim=1)
                prev = self.memory[h][index]
                ybar = torch.where(prev >= 0, prev, y)
            z1, z2 = f1 @ self.w_prev[h] / c.t_x, f2 @ self.w_prev[h] / c.t_x
            loss = loss + center_loss(f1, w, y, c.t_w) + center_loss(f2, w, y, c.t_w)
            loss = loss + representation_loss(z1, z2, ybar, c.tau) + representation_loss(z2, z1, ybar, c.tau)
            labels.append(y)
        loss = loss / (2 * len(self.centers))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            for h, y in enumerate(labels):
                k = self.rho[h].shape[0]
                counts = torch.bincount(y, minlength=k)
                self.rho[h] = dual_step(self.rho[h], counts, b, c.eta, self.gammas[h])
                old = self.memory[h][index]
                self.hist[h] += counts - torch.bincount(old[old >= 0], minlength=k)
                self.memory[h][index] = y
        return loss.detach()


class PlainLoop(nn.Module):
    """A method's network trained as a plain loop, without its cluster side: torchvision's backbone with plain
    BatchNorm and a Linear-BN-ReLU-Linear head on both views, the loss the views' disagreement (|f1 - f2|^2 of the
    normalised projections); for AE-CM its encoder and decoder on the plain view and the reconstruction error.
    The same batch, views, precision, memory format and optimiser (the config's) as the method's djc step."""

    def __init__(self, cfg: Config, backbone: str, image_dim: int, device: torch.device):
        super().__init__()
        self.amp = amp_dtype(cfg.trainer.precision, device)
        self.autoencoder = cfg.method.name == "aecm"
        if self.autoencoder:  # AE-CM's MLPs, as djc.methods.aecm builds them, float32 (no backbone to autocast)
            c = cfg.method.aecm
            self.encoder = aecm.mlp([image_dim, *c.hidden, c.code_dim])
            self.decoder = aecm.mlp([c.code_dim, *reversed(c.hidden), image_dim])
        else:
            net = resnet(18 if backbone == "resnet18_cifar" else 50, 3, backbone == "resnet18_cifar").net
            feat, hid = 512 if backbone == "resnet18_cifar" else 2048, cfg.model.proj_hidden
            self.backbone = net
            self.proj = nn.Sequential(nn.Linear(feat, hid), nn.BatchNorm1d(hid), nn.ReLU(inplace=True),
                                      nn.Linear(hid, cfg.model.proj_dim))
        self.to(device)
        if not self.autoencoder and nhwc(cfg.trainer.memory_format, device):
            self.backbone.to(memory_format=torch.channels_last)
        o = cfg.optim
        self.opt = (torch.optim.SGD(self.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
                    if o.name == "sgd" else torch.optim.Adam(self.parameters(), lr=o.lr, weight_decay=o.weight_decay))

    def step(self, x1: Tensor, x2: Tensor) -> Tensor:
        if self.autoencoder:
            x = x1.flatten(1)  # x2 is the same plain view
            loss = (x - self.decoder(self.encoder(x))).pow(2).sum(dim=1).mean()
        else:
            b = x1.shape[0]
            with torch.autocast(x1.device.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None):
                f = self.backbone(torch.cat([x1, x2]))
            f = F.normalize(self.proj(f.float()), dim=1)
            loss = (f[:b] - f[b:]).pow(2).sum(dim=1).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()
