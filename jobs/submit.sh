#!/usr/bin/env bash
# Submit a djc training run to a Ray cluster as a job.
#
#   RAY_ADDRESS=http://127.0.0.1:8265 jobs/submit.sh jobs/cifar10_lt.yaml --out s3://BUCKET/runs/cifar10_lt [key=value ...]
#
# The repository is uploaded as the job's working dir (files that .gitignore names stay behind), and
# `python -m djc.cli train CONFIG ...` runs there, on the head node: it imports the uploaded djc, joins the
# cluster (Ray sets RAY_ADDRESS inside the job) and starts its workers on the GPU nodes. Everything after
# CONFIG goes to `djc train` as is. On a cluster of several nodes, give --out an s3:// URL: every worker
# writes checkpoints there, and the run dir outlives the cluster.
#
# RAY_ADDRESS is the cluster's job server, its dashboard on port 8265. The head keeps it on its loopback
# (cluster.yaml); `ray dashboard cluster.yaml` forwards it to this machine over SSH. Extra `ray job submit`
# options go in SUBMIT_ARGS, e.g. SUBMIT_ARGS="--no-wait --submission-id cifar10-lt-1".
set -euo pipefail

die() { echo "jobs/submit.sh: $*" >&2; exit 2; }

[[ $# -ge 1 ]] || die "usage: RAY_ADDRESS=http://HEAD:8265 jobs/submit.sh CONFIG.yaml [--out URL] [key=value ...]"
[[ -n "${RAY_ADDRESS:-}" ]] || die "RAY_ADDRESS is not set: give the cluster's job server, e.g." \
  "RAY_ADDRESS=http://127.0.0.1:8265 after \`ray dashboard cluster.yaml\`"
[[ -f "$1" ]] || die "no run config at $1"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
config="$(cd "$(dirname "$1")" && pwd -P)/$(basename "$1")"
[[ "$config" == "$repo/"* ]] || die "$1 is outside the repository ($repo); it must travel with the working dir"
shift

# One line instead of a traceback, in seconds, when nothing answers at RAY_ADDRESS.
"${PYTHON:-python3}" - "$RAY_ADDRESS" <<'EOF' || exit 2
import sys, urllib.request
url = sys.argv[1].rstrip("/")
try:
    urllib.request.urlopen(url + "/api/version", timeout=10).read()
except Exception as err:
    sys.exit(f"jobs/submit.sh: no Ray job server at RAY_ADDRESS={url} ({err}); start the cluster "
             f"(ray up cluster.yaml) and forward its dashboard (ray dashboard cluster.yaml)")
EOF

cd "$repo"
# shellcheck disable=SC2086  # SUBMIT_ARGS holds several options on purpose
exec ray job submit --address "$RAY_ADDRESS" --working-dir . ${SUBMIT_ARGS:-} \
  -- python -m djc.cli train "${config#"$repo"/}" "$@"
