#!/usr/bin/env bash
# Builds the wheelhouse benchmarks/gpu_check.sh installs from on a GPU machine without network: the packages of
# benchmarks/wheelhouse.txt and their dependencies, as binary wheels for CPython 3.12 on x86-64 Linux (what the
# GPU machines lent to this project run), in .whl/ (git-ignored; it travels as a `carry` path, 64 MiB at most
# with everything else: tests/test_gpu_check.py keeps it under 40 MiB; about 6 MiB today).
#
#   benchmarks/wheelhouse.sh [DIR]                        # default DIR: .whl
#   WHEELHOUSE_PYTHON=3.11 benchmarks/wheelhouse.sh DIR   # for another Python (a rehearsal on this machine)
#
# Needs PyPI. A machine with network does not need it: gpu_check.sh then installs what is missing with pip.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
py=${WHEELHOUSE_PYTHON:-3.12}
rm -rf "$dest"
mkdir -p "$dest"
# --only-binary with an explicit interpreter and platform: pip resolves for that machine, not this one, and
# never builds from source (the GPU machine could not either).
${PIP:-python3 -m pip} download --quiet --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d "$dest" -r benchmarks/wheelhouse.txt
du -sh "$dest"
ls "$dest"
