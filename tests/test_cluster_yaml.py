"""cluster.yaml, docker/ and the cluster run configs agree with each other and with what Ray accepts.

The image cannot be built here (no Docker engine), so what can be checked without it is checked: the launcher
config against the schema inside the ray package, the image name and user it names against docker/, every
dependency pinned in the image, and each cluster job's arithmetic and fit on the GPU nodes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

from djc.config import load_config

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, as in the image and CI

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = yaml.safe_load((ROOT / "cluster.yaml").read_text())
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()
CLUSTER_JOBS = ["cifar10_lt", "cifar100_lt", "imagenet_lt"]


def test_cluster_yaml_validates_against_rays_own_schema():
    import ray.autoscaler
    from ray.autoscaler._private.util import validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(CLUSTER, schema)
    validate_config(CLUSTER)  # the schema plus Ray's own cross-checks (head type, min/max workers)


def test_the_image_cluster_yaml_runs_is_the_one_docker_builds():
    built = re.search(r'IMAGE="\$\{IMAGE:-([^}]+)\}"', (ROOT / "docker" / "build.sh").read_text()).group(1)
    assert CLUSTER["docker"]["image"] == built
    assert not {"head_image", "worker_image"} & set(CLUSTER["docker"])
    for node in CLUSTER["available_node_types"].values():
        assert "worker_image" not in node.get("docker", {})
    # The tag says what is inside: djc's version and the base image's CUDA.
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    base = re.search(r"ARG BASE=pytorch/pytorch:([\d.]+)-cuda(\d+)\.(\d+)-", DOCKERFILE)
    assert built.rsplit(":", 1)[1] == f"{version}-cu{base.group(2)}{base.group(3)}"


def test_the_setup_cluster_yaml_names_is_in_the_image():
    # Nothing is installed at node start: the commands only start Ray, which the image holds (pinned).
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert CLUSTER.get(key, []) == [], key
    pins = _pins()
    assert "ray" in pins
    commands = " ".join(CLUSTER["head_start_ray_commands"] + CLUSTER["worker_start_ray_commands"])
    assert re.findall(r"\bray (start|stop)\b", commands)
    # The launcher's `~/` and the container's home are the image's non-root user's.
    user = re.findall(r"^USER (\S+)", DOCKERFILE, re.M)
    assert user == ["ray"] and "useradd --create-home --uid 1000 --shell /bin/bash ray" in DOCKERFILE
    assert "rsync" in DOCKERFILE  # the launcher syncs its bootstrap files into the container with it
    # What the image copies is what pyproject packages.
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for pkg in (p.rstrip("*") for p in packages["include"]):
        assert f"COPY --chown=ray:ray {pkg} ./{pkg}" in DOCKERFILE


def _pins() -> dict[str, Requirement]:
    lines = (ROOT / "docker" / "requirements.txt").read_text().splitlines()
    reqs = [Requirement(ln) for ln in lines if ln.strip() and not ln.startswith("#")]
    return {r.name.lower(): r for r in reqs}


def test_every_dependency_is_pinned_in_the_image_within_pyprojects_range():
    pins = _pins()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):
        pin = pins[dep.name.lower()]
        (spec,) = pin.specifier
        assert spec.operator == "==", pin
        assert dep.specifier.contains(spec.version), (dep, pin)
        assert dep.extras <= pin.extras, (dep, pin)
    base_torch = re.search(r"ARG BASE=pytorch/pytorch:([\d.]+)-", DOCKERFILE).group(1)
    assert str(pins["torch"].specifier) == f"=={base_torch}"


def test_the_dashboard_is_not_exposed():
    head = " ".join(CLUSTER["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    ports = {(p["FromPort"], p["ToPort"]) for p in CLUSTER["provider"]["security_group"]["IpPermissions"]}
    assert ports == {(22, 22)}


@pytest.mark.parametrize("job", CLUSTER_JOBS)
def test_cluster_jobs_show_their_arithmetic_and_fit_the_gpu_nodes(job):
    text = (ROOT / "jobs" / f"{job}.yaml").read_text()
    cfg = load_config(ROOT / "jobs" / f"{job}.yaml")
    per_gpu, gpus, total = map(int, re.search(r"(\d+) per GPU x (\d+) GPUs = (\d+) global", text).groups())
    assert per_gpu * gpus == total == cfg.data.batch_size and gpus == cfg.trainer.num_workers
    base_lr, ref = re.search(r"lr: \S+ +# ([\d.]+) at the global batch of (\d+)", text).groups()
    assert cfg.optim.lr == pytest.approx(float(base_lr) * cfg.data.batch_size / int(ref))
    assert cfg.trainer.use_gpu and cfg.trainer.max_failures > 0

    gpu_nodes = [n for n in CLUSTER["available_node_types"].values() if n["resources"].get("GPU")]
    (node,) = gpu_nodes
    per_node = node["resources"]["GPU"]
    assert cfg.trainer.num_workers <= per_node * min(node["max_workers"], CLUSTER["max_workers"])
    assert cfg.trainer.cpus_per_worker * per_node <= node["resources"]["CPU"]
    assert cfg.data.loader_workers < cfg.trainer.cpus_per_worker
