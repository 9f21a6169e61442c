"""The registry: every method djc trains, one entry each. Adding a method is its module (the method class and its
config section), one entry here, and its test (docs/adding-a-method.md); nothing else names methods.

The config tree's `method` section gets one field per entry (djc/config.py builds it from here), `djc tune
--space NAME` finds the entry's search space, `djc bench quality` runs the entries' jobs, and
`djc.step.build_method` builds the selected one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from djc.methods.aecm import AECM, AECMConfig
from djc.methods.base import ClusteringMethod, MethodSettings
from djc.methods.dcl import DCL, DCLConfig
from djc.methods.p2ot import P2OT, P2OTConfig
from djc.methods.secu import SeCu, SeCuConfig
from djc.methods.statdec import StatDEC, StatDECConfig


@dataclass(frozen=True)
class Entry:
    cls: type[ClusteringMethod]  # built as cls(its config section, djc.methods.base.Setup)
    config: type[MethodSettings]  # the section `method.<name>`; its defaults are the recommended values
    space: str = ""  # "package.module:function" of its djc tune search space ("" = none)
    job: str = ""  # the run config that `djc bench quality` runs by default ("" = none)


REGISTRY: dict[str, Entry] = {
    "secu": Entry(SeCu, SeCuConfig, "tune.spaces:secu", "jobs/digits_lt.yaml"),
    "dcl": Entry(DCL, DCLConfig, "tune.spaces:dcl", "jobs/digits_lt_dcl.yaml"),
    "statdec": Entry(StatDEC, StatDECConfig, "tune.spaces:statdec", "jobs/digits_lt_statdec.yaml"),
    "aecm": Entry(AECM, AECMConfig, "tune.spaces:aecm", "jobs/digits_lt_aecm.yaml"),
    "p2ot": Entry(P2OT, P2OTConfig, "tune.spaces:p2ot", "jobs/digits_lt_p2ot.yaml"),
}

_listeners: list[Callable[[], None]] = []


def register(name: str, entry: Entry) -> None:
    """Add a method at run time (a plugin, or a test's toy method): the config tree gains its section."""
    if not name.isidentifier() or name in ("name", "num_clusters", "kmeans"):
        raise ValueError(f"method name {name!r} must be an identifier other than name, num_clusters, kmeans")
    REGISTRY[name] = entry
    for listener in _listeners:
        listener()


def unregister(name: str) -> None:
    del REGISTRY[name]
    for listener in _listeners:
        listener()


def on_change(listener: Callable[[], None]) -> None:
    """Call `listener` after every (un)registration (djc.config rebuilds its `method` section)."""
    _listeners.append(listener)
