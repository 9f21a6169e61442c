"""benchmarks/gpu_check.sh and its wheelhouse, checked where there is no GPU: the wheelhouse recipe stays small
enough to travel with a device run, the script names every test file with `gpu` tests, and the whole script runs
end to end on a CPU (its rehearsal mode), so the first GPU run does not fail on a typo."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _wheel_groups() -> set[str]:
    """Every package the script may ask the wheelhouse for (the third field of its `needs` table)."""
    text = SCRIPT.read_text()
    groups = re.findall(r'\("[^"]+", "[^"]+",\s*"([a-z\- ]+)"\)', text)
    assert len(groups) == 4, groups
    return {name for g in groups for name in g.split()}


@pytest.mark.slow
def test_the_wheelhouse_recipe_builds_a_small_python_312_wheelhouse(tmp_path):
    """Needs PyPI. The device's carry holds 64 MiB with the working tree: the wheelhouse must stay under 40."""
    dest = tmp_path / "whl"
    subprocess.run(["bash", str(REPO / "benchmarks" / "wheelhouse.sh"), str(dest)], check=True,
                   capture_output=True, text=True, timeout=600)
    wheels = sorted(dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    print(f"\n[wheelhouse] {len(wheels)} wheels, {size / 2**20:.1f} MiB")
    assert size < 40 * 2**20
    for w in wheels:  # name-version-python-abi-platform.whl: pure Python, or CPython 3.12 on x86-64 Linux
        python, abi, plat = w.stem.split("-")[-3:]
        assert (python, abi, plat) == ("py3", "none", "any") or (
            python == "cp312" and "x86_64" in plat and "manylinux" in plat), w.name
    have = {re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower() for w in wheels}
    assert _wheel_groups() | {"setuptools"} <= have, _wheel_groups() - have


def test_the_script_runs_every_test_file_with_gpu_tests():
    marked = {f"tests/{p.name}" for p in (REPO / "tests").glob("test_*.py")
              if re.search(r"mark\.gpu|marks=pytest\.mark\.gpu", p.read_text())}
    listed = set(re.search(r'^GPU_TESTS="([^"]+)"', SCRIPT.read_text(), re.M).group(1).split())
    assert marked == listed


@pytest.mark.slow
def test_the_script_rehearses_end_to_end_on_a_cpu(tmp_path):
    """GPU_CHECK_ALLOW_CPU=1: the install check, the gpu tests (skipped here, with their reason), a small bench
    with one method and a forced profile, and the summary, as the device run would make them."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_ALLOW_CPU": "1", "WHEELHOUSE": str(tmp_path / "none"),
           "GPU_CHECK_BENCH_ARGS": "--models resnet18_cifar --batch-size 4 --rounds 1 --methods aecm "
                                   "--profile always method.secu.num_heads=2"}
    r = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (out / "summary.md").read_text()
    assert "rehearsal of the script on the CPU" in summary
    for row in ("| install | ok |", "| gpu tests | ok |", "| bench | ok |"):
        assert row in summary, summary
    assert "SKIPPED" in summary and "no CUDA device here" in summary
    assert "| resnet18_cifar | 32 | 4 | float32 |" in summary and "| aecm | float32 |" in summary
    assert "GFLOP / step" in summary
    profiles = (out / "profiles.txt").read_text()
    assert "===== profile-cpu-resnet18_cifar.txt" in profiles and "===== profile-cpu-resnet18_cifar-aecm.txt" in profiles
    assert not list(out.glob("profile-*.txt")), "the profiles are gathered into profiles.txt"
    # The device tool returns the first 8 files by name: summary.md must be among them, and is printed too.
    assert "summary.md" in sorted(p.name for p in out.iterdir())[:8] and "## throughput" in r.stdout
    for name in ("env.txt", "install.log", "tests.log", "tests.xml", "bench.log", "throughput-cpu.json"):
        assert (out / name).is_file(), name
