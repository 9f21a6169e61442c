#!/usr/bin/env bash
# Build the image cluster.yaml runs, from the repository root, and print its name. Push it where the nodes
# can pull it (docker push "$IMAGE"); a different registry must be changed here and in cluster.yaml together
# (tests/test_cluster_yaml.py checks that they match).
#   docker/build.sh && docker push ghcr.io/djc-project/djc:0.1.0-cu128
set -euo pipefail
IMAGE="${IMAGE:-ghcr.io/djc-project/djc:0.1.0-cu128}"  # djc's version - the base image's CUDA
cd "$(dirname "$0")/.."
DOCKER_BUILDKIT=1 docker build -f docker/Dockerfile -t "$IMAGE" .
echo "$IMAGE"
