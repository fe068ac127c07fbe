#!/usr/bin/env bash
# Fetch, here, the wheels dhow needs on the lent GPU machine that its image lacks (it has CUDA torch, numpy, grpcio,
# protobuf, pyyaml, prometheus-client, uvloop, click, h11; nothing can be downloaded there). They land in .whl/
# (ignored by git through its info/exclude) and travel with `carry: [".whl"]`; there, before the benchmark:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
#   PYTHONPATH=src:/tmp/site python3 benchmarks/gpu_serving.py
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
# the versions dhow is tested with, read from its virtualenv
wheels=$(.venv/bin/python - <<'PY'
from importlib.metadata import version
# protobuf and grpcio too: the generated stubs refuse older runtimes than the ones they were made with
names = ["uvicorn", "httptools", "orjson", "cryptography", "cffi", "pycparser", "PyJWT", "redis", "protobuf", "grpcio"]
print(" ".join(f"{name}=={version(name)}" for name in names))
PY
)
# shellcheck disable=SC2086  # one word per requirement
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl $wheels
ls -la .whl
