"""Joining a Ray cluster or starting a private local instance on loopback, and admitting a run to it.

The only place djc starts or joins Ray; djc/launch.py calls it before building a run's TorchTrainer.
"""

from __future__ import annotations

import os
import re
import socket
import time

from djc.config import Config, ConfigError


def cluster_address(cfg: Config) -> tuple[str, str]:
    """(address, the setting it came from); ("", "") = no cluster named: train on a local instance."""
    if cfg.trainer.ray_address:
        return cfg.trainer.ray_address, "trainer.ray_address"
    return os.environ.get("RAY_ADDRESS", ""), "RAY_ADDRESS"


def _check_reachable(address: str, source: str) -> None:
    """Fail in seconds, naming the setting, where ray.init would retry for a minute or wait forever."""
    if address == "auto":
        return  # ray.init finds the head under $RAY_TMPDIR or fails at once
    hostport = address.removeprefix("ray://")
    if "://" in hostport:
        raise ConfigError(f"{source}={address} is not a Ray cluster address: djc train joins the head's GCS "
                          f"(host:6379, or ray://host:10001); http://host:8265 is the job server, for "
                          f"`ray job submit` (jobs/submit.sh), which sets the address inside the job itself")
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as err:
        raise ConfigError(f"{source}={address}: no Ray cluster reachable there ({err}); start one "
                          f"(`ray start --head`, `ray up cluster.yaml`) or unset {source} to train on a local "
                          f"Ray instance") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Set for a local instance before Ray starts its processes (they inherit the environment). Without the first,
# Ray on Linux turns node IP 127.0.0.1 into the host's routable address and its GCS, raylet, worker and agent
# ports listen on every interface: with authentication off, that is remote code execution for anyone on the
# network. With it, every port listens on 127.0.0.1 only (tests/test_bad_input.py lists them).
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "GLOO_SOCKET_IFNAME": "lo",
    "RAY_AUTH_MODE": "disabled",  # nothing but this machine's own processes can reach a loopback instance
    # One machine is never preempted; the watcher only adds an actor and an error line at start-up.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def _keep_on_loopback() -> None:
    """The environment of a private local instance, also when `ray` was imported before (Ray reads the first
    variable into a module constant at import; its node-IP lookup reads the constant at call time)."""
    for key, value in LOOPBACK_ENV.items():
        os.environ[key] = value
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def ensure_ray(cfg: Config) -> None:
    """Join the cluster the config or RAY_ADDRESS names, else start a private local instance on loopback.

    The local instance runs Ray's dashboard on 127.0.0.1, and its address reaches every Ray process through
    RAY_API_SERVER_ADDRESS: Ray Train's PlacementGroupCleaner asks the state API whether a run's controller is
    still alive, to free the CPUs of a run that crashed or that Tune stopped (without it, every stopped trial of
    `djc tune` keeps its CPUs and the next trials wait forever). Left to find the dashboard by itself it fails
    with a 30-line "Found multiple active Ray instances" traceback whenever another Ray instance runs on the
    machine, and with a warning every few seconds when there is no dashboard.
    """
    import ray

    if ray.is_initialized():
        return
    address, source = cluster_address(cfg)
    if address:
        _check_reachable(address, source)
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as err:
            raise ConfigError(f"{source}={address}: cannot join a Ray cluster there ({err})") from None
        _collapse_crash_dumps()
        return
    _keep_on_loopback()
    port = _free_port()
    env = {"GLOO_SOCKET_IFNAME": "lo", "PYTHONWARNINGS": "ignore", "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    # address="local": a new instance even when a `ray start` head runs on this machine (ray.init() would
    # silently join the latest one found under $RAY_TMPDIR instead of the one the user asked for). Every worker
    # gets a thread (DJC_THREADS_PER_WORKER), so 2 cores are shared fairly.
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": env}, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port)
    _collapse_crash_dumps()


# The first line of a dying process's dump: Ray's C++ signal handler, a failed Ray check, Python's faulthandler.
CRASH_START = re.compile(r"\*\*\* (SIG[A-Z]+|Signal \d+) received at time=|Fatal Python error: |Check failure stack trace|"
                         r"logging\.cc:\d+: Stack trace")


class CrashDumpFilter:
    """Ray's forwarding of workers' output to the driver, with each crash dump collapsed to one line.

    A worker that dies hard (a signal, a failed Ray check) prints 20-110 lines: native frames, Python's stack,
    every loaded extension module. When one worker raises a user's error, its sibling can die this way while Ray
    tears the group down, and the dump buried the run's one-line error. The dump stays whole in the worker's
    .err log; the terminal gets the line naming it, and nothing more from that process."""

    def __init__(self, forward, logs_dir: str):
        self.forward, self.logs_dir, self.crashed = forward, logs_dir, set()

    def __call__(self, data: dict) -> None:
        pid, lines = data.get("pid"), data.get("lines") or []
        if pid in self.crashed:
            return
        for i, line in enumerate(lines):
            if match := CRASH_START.search(line):
                self.crashed.add(pid)
                signal = match.group(1) or match.group(0).strip(": ")
                note = (f"[djc] this worker crashed ({signal}); its dump is in Ray's log worker-*-{pid}.err under "
                        f"{self.logs_dir} on {data.get('ip', 'its node')}")
                self.forward({**data, "lines": [*lines[:i], note]})
                return
        self.forward(data)


def _collapse_crash_dumps() -> None:
    """Put CrashDumpFilter in front of Ray's printer of workers' output (Ray's private dispatcher; where a Ray
    release has none of it, the output stays as Ray prints it)."""
    try:
        from ray._private import ray_logging
        from ray._private.worker import _global_node
    except ImportError:
        return
    dispatcher = getattr(ray_logging, "global_worker_stdstream_dispatcher", None)
    printers = [h for name, h in getattr(dispatcher, "handlers", []) if name == "ray_print_logs"]
    if len(printers) != 1 or isinstance(printers[0], CrashDumpFilter):
        return
    logs = _global_node.get_logs_dir_path() if _global_node is not None else "/tmp/ray/session_latest/logs"
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", CrashDumpFilter(printers[0], logs))


def node_span() -> tuple[int, bool]:
    """(alive nodes of the joined cluster, whether its autoscaler may add more: its maximum of some resource
    exceeds what the alive nodes hold)."""
    import ray

    alive = sum(1 for n in ray.nodes() if n["Alive"])
    ceiling, total = _autoscaler_ceiling(), ray.cluster_resources()
    grows = ceiling is not None and any(v > total.get(k, 0.0) + 1e-9 for k, v in ceiling.items())
    return alive, grows


def worker_bundle(cfg: Config) -> dict[str, float]:
    """What one training worker reserves on one node."""
    return {"CPU": cfg.trainer.cpus_per_worker} | ({"GPU": 1.0} if cfg.trainer.use_gpu else {})


def worker_slots(cfg: Config) -> int:
    """How many training workers the live nodes can hold at once (each worker's bundle fits on one node)."""
    import ray

    bundle = worker_bundle(cfg)
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    return sum(min(int(r.get(k, 0.0) / v + 1e-9) for k, v in bundle.items()) for r in nodes)


def _autoscaler_ceiling() -> dict[str, float] | None:
    """The most of each resource the autoscaler may bring up (cluster.yaml's max_workers), None without one."""
    from ray._private import state  # what Ray Train itself asks before it waits for a worker group

    try:
        return state.state.get_max_resources_from_cluster_config()
    except Exception:  # an older Ray, or no GCS support for it: fall back to the live nodes
        return None


def cluster_capacity() -> dict[str, float]:
    """The most of each resource the cluster can offer: its autoscaler's maximum, else the live nodes' total."""
    import ray

    ceiling = _autoscaler_ceiling()
    return ceiling if ceiling is not None else ray.cluster_resources()


def check_resources(cfg: Config) -> None:
    """Refuse a run the cluster cannot hold instead of waiting forever for its placement group.

    With an autoscaler, the run must fit the cluster at its largest; the autoscaler then adds the nodes. Without
    one, the run must fit the live nodes: a joined cluster (RAY_ADDRESS / trainer.ray_address) gets
    trainer.resource_wait_s for nodes started by hand to join; a local instance cannot grow and fails at once.
    """
    import ray

    t = cfg.trainer
    need = (f"trainer.num_workers={t.num_workers} workers x {worker_bundle(cfg)} (trainer.use_gpu="
            f"{str(t.use_gpu).lower()}, trainer.cpus_per_worker={t.cpus_per_worker:g})")
    ceiling = _autoscaler_ceiling()
    if ceiling is not None:
        short = {k: v * t.num_workers for k, v in worker_bundle(cfg).items()
                 if ceiling.get(k, 0) + 1e-9 < v * t.num_workers}
        if short:
            raise ConfigError(f"the cluster cannot hold this run even at its largest: it needs {need}, and its "
                              f"autoscaler can reach only {ceiling} (max_workers in cluster.yaml)")
        return
    grows = bool(cluster_address(cfg)[0])
    deadline = time.monotonic() + (t.resource_wait_s if grows else 0.0)
    while (slots := worker_slots(cfg)) < t.num_workers:
        total = ray.cluster_resources()
        have = f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs on {len(ray.nodes())} node(s)"
        if time.monotonic() >= deadline:
            waited = f" after waiting {t.resource_wait_s:g} s (trainer.resource_wait_s)" if grows else ""
            raise ConfigError(f"the cluster cannot hold this run: it needs {need} but has {have}, room for "
                              f"{slots} worker(s){waited}")
        print(f"[djc] waiting for nodes to join: need {need}, have {have}", flush=True)
        time.sleep(min(15.0, max(0.1, deadline - time.monotonic())))

