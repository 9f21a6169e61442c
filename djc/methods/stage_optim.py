"""The AE-CM release's optimisers as one torch optimiser: SGD with momentum while the autoencoder pretrains, Adam
after it, a fresh optimiser state at every stage change, and TensorFlow's "epsilon hat".

The release (TensorFlow) pretrains the AE with SGD (lr 1e-2, momentum 0.9 on MNIST), then builds a new Adam for the
clustering-module stage and another for the joint stage. djc's training loop owns one optimiser for the whole run
(checkpointed with it), so the stages live inside this one: `stage()` reads the method's current stage, and the
state of every parameter is dropped when the stage changes (`fresh`) or the update rule does (SGD -> Adam).

TensorFlow's Adam adds epsilon to sqrt(v) before the bias correction, which it folds into the step size:
    p -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps_hat)
torch's Adam adds it after: p -= lr / (1 - b1^t) m / (sqrt(v) / sqrt(1 - b2^t) + eps). The same eps is
1 / sqrt(1 - b2^t) times larger in TensorFlow's form: 31.6x at step 1, 3.2x at step 100, 1.26x at step 1,000.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor


class StageOptimizer(torch.optim.Optimizer):
    def __init__(self, groups: list[dict], stage: Callable[[], int], *, lr: float, eps: float, eps_hat: bool,
                 fresh: bool, sgd_stage: int | None = None, sgd_lr: float = 0.0, sgd_momentum: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0):
        """groups: torch param groups (lr, eps, weight_decay per group); stage() -> the current stage number;
        sgd_stage: the stage trained with SGD at the constant sgd_lr, sgd_momentum (None: Adam throughout)."""
        defaults = {"lr": lr, "eps": eps, "betas": betas, "weight_decay": weight_decay, "stage": -1}
        super().__init__(groups, defaults)
        self.stage, self.eps_hat, self.fresh = stage, eps_hat, fresh
        self.sgd_stage, self.sgd_lr, self.sgd_momentum = sgd_stage, sgd_lr, sgd_momentum

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = closure() if closure is not None else None
        stage = self.stage()
        sgd = stage == self.sgd_stage
        for group in self.param_groups:
            if group["stage"] != stage:
                if self.fresh or (group["stage"] == self.sgd_stage) != sgd:  # a new optimiser: zero moments, t = 0
                    for p in group["params"]:
                        self.state.pop(p, None)
                group["stage"] = stage
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad if group["weight_decay"] == 0 else p.grad.add(p, alpha=group["weight_decay"])
                st = self.state[p]
                if sgd:  # TensorFlow's momentum SGD: v <- momentum v - lr g; p <- p + v
                    v = st.setdefault("velocity", torch.zeros_like(p))
                    v.mul_(self.sgd_momentum).add_(g, alpha=-self.sgd_lr)
                    p.add_(v)
                    continue
                if not st:
                    st.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                st["step"] += 1
                t, m, v = st["step"], st["exp_avg"], st["exp_avg_sq"]
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                bc1, bc2 = 1 - b1**t, math.sqrt(1 - b2**t)
                if self.eps_hat:
                    p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-group["lr"] * bc2 / bc1)
                else:  # torch's Adam
                    p.addcdiv_(m, v.sqrt().div_(bc2).add_(group["eps"]), value=-group["lr"] / bc1)
        return loss
