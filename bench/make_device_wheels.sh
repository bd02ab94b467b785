#!/usr/bin/env bash
# Downloads (on a machine with the package registry) the wheels a bare GPU machine lacks, into
# device_wheels/ (git-ignored), for Python 3.12 on x86_64; bench/device_setup.sh installs them there
# over the machine's own torch. Run from the repository root.
set -euo pipefail
PIP=${PIP:-.venv/bin/pip}
mkdir -p device_wheels
$PIP download -q --no-deps --python-version 3.12 --only-binary=:all: \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
  -d device_wheels \
  transformers==5.23.0 peft==0.21.2 webdataset==1.0.2 zarr==3.1.6 numcodecs donfig google-crc32c \
  segment-anything==1.0 typing_extensions braceexpand hjson msgpack py-cpuinfo einops \
  pydantic pydantic-core annotated-types typing-inspection \
  pytest iniconfig pluggy pygments packaging  # the CUDA-only tests run there
# DeepSpeed ships as a source package: build its (pure Python) wheel with no CUDA ops
DS_BUILD_OPS=0 $PIP wheel -q --no-deps --no-build-isolation -w device_wheels deepspeed==0.19.8
