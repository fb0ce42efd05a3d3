#!/usr/bin/env bash
# Wheels of what device_check.py needs and the GPU machine's image lacks (it has torch, lightning,
# torchmetrics, diffusers' needs, timm, safetensors and pytest, but no Hydra, lpips, diffusers or
# torch-fidelity), for its Python 3.12 on x86-64, into .whl/ (ignored by git: carry it).
# Run here, where PyPI is reachable:  bash benchmarks/device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
mkdir -p .whl
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
# The versions the test suite ran with here (the project's .venv, when there is one): the GPU runs the
# code that passed on the CPU, not whatever was released since.
packages=(hydra-core omegaconf diffusers lpips torch-fidelity)
pins=()
for name in "${packages[@]}"; do
  version=""
  if [ -x .venv/bin/python ]; then
    version=$(.venv/bin/python -c 'import sys; from importlib.metadata import version; print(version(sys.argv[1]))' "$name" 2>/dev/null || true)
  fi
  pins+=("${name}${version:+==$version}")
done
echo "wheels of: ${pins[*]}"
rm -f .whl/*.whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${pins[@]}"
# antlr4-python3-runtime 4.9.3 (what omegaconf 2.3 pins) is published only as source: pure Python,
# so a wheel built here installs there.
python3 -m pip wheel --quiet --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -1 .whl
