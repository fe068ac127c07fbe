#!/usr/bin/env bash
# make image: build dhow's CPU image (Dockerfile) and its CUDA variant (Dockerfile.cuda) with the container engine
# that is running here: $CONTAINER_ENGINE if set, else docker, else podman.
#   IMAGE=registry.example.com/dhow TAG=0.1.0 make image   ->  IMAGE:TAG and IMAGE:TAG-cuda
set -euo pipefail
cd "$(dirname "$0")/.."
image="${IMAGE:-dhow}"
tag="${TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)}"
engine="${CONTAINER_ENGINE:-}"
if [ -z "$engine" ]; then
  for candidate in docker podman; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" info >/dev/null 2>&1; then
      engine="$candidate"
      break
    fi
  done
fi
if [ -z "$engine" ] || ! "$engine" info >/dev/null 2>&1; then
  echo "make image: no container engine is running here (${CONTAINER_ENGINE:-docker or podman}: 'info' fails or" \
    "the command is missing), so no image was built. Start the Docker daemon or install Podman, or set" \
    "CONTAINER_ENGINE to an engine that runs, then run 'make image' again." >&2
  exit 1
fi
"$engine" build -f Dockerfile -t "$image:$tag" .
"$engine" build -f Dockerfile.cuda -t "$image:$tag-cuda" .
echo "built $image:$tag and $image:$tag-cuda"
