#!/usr/bin/env bash
# Downloads the wheels the device check needs on a GPU machine that has no network (python 3.12, Linux x86_64,
# with torch, transformers, peft, grpcio and safetensors preinstalled) into wheels/ (or the folder given).
# There: pip install --no-index --no-deps wheels/*.whl && python -m benchmarks.device_check --out-dir "$OUT"
# The list and its reasons are in benchmarks/README.md ("The device check"). Ray is not needed.
set -euo pipefail

target="${1:-wheels}"
mkdir -p "$target"
packages=(
    "diffusers==0.42.1"             # the pipelines the generator runs; not preinstalled
    "pillow==13.0.0"                # diffusers and our PNG files
    "protobuf==7.36.2"              # the generated code needs >= 7.35.1
    "grpcio==1.85.3"                # the generated code needs >= 1.85.1; the preinstalled one may be older
    "grpcio-health-checking==1.85.1"
    "prometheus-client==0.26.0"     # imported by both services (common/metrics.py)
    "blake3==1.0.11"                # the tensor wire checksum
)
# --platform may be given several times; pip takes a wheel for any of them (pillow ships manylinux_2_28).
python -m pip download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$target" "${packages[@]}"
du -ch "$target"/*.whl | tail -n 1
