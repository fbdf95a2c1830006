#!/usr/bin/env bash
# Wheels kvq needs that the GPU host's image lacks (docs/kernels.md, "The device check"), downloaded here into
# the git-ignored .whl/ so that a device call can carry them (carry: ["bench/device_model", ".whl"]).
# The image (Python 3.12) has torch, triton, transformers, accelerate, safetensors, rich, pytest, pytest-xdist
# and pytest-timeout; kvq's commands also import pydantic and typer >= 0.29. The versions are this venv's.
# (typing_extensions: pydantic needs a newer one than the image may hold.)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
for name in pydantic pydantic_core annotated-types typing-inspection typing_extensions typer; do
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$name==$(version "$name")"
done
ls -1 .whl
