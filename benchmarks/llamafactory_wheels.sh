#!/usr/bin/env bash
# Wheels of LLaMA-Factory 0.9.5 and the stack it pins, for gpu_throughput.py's llamafactory variants
# on a machine without package access (Python 3.12, x86_64): they go to .lfwhl/ and are installed
# there into their own folder, apart from qvltune's:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/lfsite .lfwhl/*.whl
#   python benchmarks/gpu_throughput.py ... --variants llamafactory,llamafactory-packed --llamafactory-site /tmp/lfsite
# torch, torchvision, torchaudio, pyarrow, pandas and xxhash are expected on that machine already.
# dill and multiprocess are held below datasets 4.0.0's caps (<0.3.9, <0.70.17).
set -euo pipefail
dest="${1:-.lfwhl}"
mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d "$dest" \
  llamafactory==0.9.5 transformers==5.6.0 peft==0.18.1 accelerate==1.11.0 trl==0.24.0 datasets==4.0.0 \
  tokenizers==0.22.2 dill==0.3.8 multiprocess==0.70.16 fsspec==2025.3.0 omegaconf antlr4-python3-runtime
ls "$dest"
