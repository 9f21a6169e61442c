"""Search spaces: one small function per method, from the run config to {dotted config key: Ray Tune domain}.

They search what each method leaves to the data: loss weights, temperatures and constraint
strengths, around the job's own values where those scale with the data (SeCu's alpha goes as 1/N: 6000 on
CIFAR, 100 on 562 digits), over fixed ranges where the papers agree on one (temperatures). Encoder, batch and
schedule stay the job's: a trial differs from `djc train CONFIG` only in these keys, so best.yaml reproduces it.

`djc tune --space NAME` takes a name below, or `package.module:function` for a space of one's own: any function
of the same shape. Keys and ranges are checked against the config (djc/config.py) before any trial starts.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from ray import tune

from djc.config import Config, ConfigError
from djc.methods import REGISTRY

Space = dict[str, Any]


def _around(value: float, factor: float) -> Any:
    """Log-uniform over [value / factor, value * factor]: a weight whose right scale depends on the data."""
    return tune.loguniform(value / factor, value * factor)


def secu(cfg: Config) -> Space:
    c = cfg.method.secu
    space: Space = {
        "method.secu.t_x": tune.loguniform(0.02, 0.2),  # the release's 0.05, x0.4 .. x4
        "method.secu.t_w": tune.loguniform(0.02, 0.2),
        "method.secu.tau": tune.uniform(0.0, 0.5),  # weight of the previous label in the target (0.2)
    }
    if c.constraint == "entropy":
        space["method.secu.alpha"] = _around(c.alpha, 4.0)  # Delta scales as 1/N: the job's value is a guess
    else:
        space["method.secu.eta"] = _around(c.eta, 10.0)  # dual step: 0.1 on CIFAR, 20 on ImageNet
        if c.gamma != "auto":
            space["method.secu.gamma"] = tune.uniform(0.1, 0.95)  # the size lower bound, as a share of N/K
    return space


def dcl(cfg: Config) -> Space:
    c = cfg.method.dcl
    space: Space = {
        "method.dcl.temperature": tune.loguniform(0.1, 1.0),
        "method.dcl.lam": tune.loguniform(0.1, 10.0),  # weight of DDC's divergence loss (1)
        "method.dcl.tau_max": tune.uniform(0.1, 0.5),  # cap of the per-anchor tau+
        "method.dcl.sigma_frac": tune.loguniform(0.05, 0.5),  # DDC kernel width (0.15)
    }
    if c.tau_plus_mode == "global":
        space["method.dcl.tau_plus"] = tune.uniform(0.0, 0.3)
    return space


def statdec(cfg: Config) -> Space:
    return {
        "method.statdec.temperature": tune.loguniform(0.1, 1.0),
        "method.statdec.lam": tune.loguniform(0.1, 10.0),  # weight of KL(P || Q)
        "method.statdec.ema": tune.uniform(0.8, 0.99),  # ~5 .. 100 steps of samples per statistic
        "method.statdec.tau_max": tune.uniform(0.1, 0.5),  # cap of the prior used as tau+
        "method.statdec.sharpen": tune.uniform(1.0, 3.0),  # power s of the target
        "method.statdec.nu": tune.choice([0.0, 1.0, 3.0]),  # Gaussian, Cauchy-like, in between
    }


def aecm(cfg: Config) -> Space:
    c = cfg.method.aecm
    space: Space = {
        "method.aecm.beta": _around(c.beta, 5.0) if c.beta > 0 else tune.loguniform(0.1, 10.0),
        "method.aecm.lam": tune.loguniform(0.1, 10.0),  # centroid orthonormality penalty (1)
    }
    if not isinstance(c.alpha, list):
        # The Dirichlet prior: alpha - 1 scales with the batch (0.46 x batch in the paper); search its scale.
        space["method.aecm.alpha"] = tune.loguniform(1.0 + (c.alpha - 1.0) / 4, 1.0 + (c.alpha - 1.0) * 4)
    return space


def p2ot(cfg: Config) -> Space:
    c = cfg.method.p2ot
    return {
        "method.p2ot.eps": tune.loguniform(0.02, 0.5),  # entropic regularisation of the plan (0.1)
        "method.p2ot.lam": tune.loguniform(0.1, 100.0),  # marginal KL weight: larger = more balanced
        "method.p2ot.rho0": tune.uniform(0.05, min(0.3, c.rho1)),  # mass transported at step 0
    }


def load(name: str) -> Callable[[Config], Space]:
    """A method's space by its name in the registry (djc/methods/__init__.py), or `package.module:function`."""
    spaces = {m: e.space for m, e in REGISTRY.items() if e.space}
    path = name if ":" in name else spaces.get(name)
    if path is None:
        raise ConfigError(f"--space {name}: unknown search space; choose one of {', '.join(spaces)} "
                          f"or give package.module:function")
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"--space {name}: cannot load it ({err})") from None
