#!/usr/bin/env bash
# Build .venv-peer: torch 2.13.0 (CPU) + kronfluence (the peer of bench/peer_kronfluence.py)
# + fastinf (editable), kept apart from .venv so kronfluence can never change its torch.
#
# kronfluence's own requirements pin other torch/transformers versions, so it is installed
# with --no-deps after its real import-time dependencies, and torch is checked after every
# step (a plain `pip install kronfluence` replaces torch with a multi-GB CUDA build).
#
# Usage (from the repository root): bash bench/setup_peer_env.sh
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=.venv-peer
TORCH_VERSION=2.13.0
PIP="$VENV/bin/pip"

check_torch() {
    local found
    found=$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
    if [[ "$found" != "$TORCH_VERSION" ]]; then
        echo "setup_peer_env: torch is $found after '$1', expected $TORCH_VERSION; aborting." >&2
        exit 1
    fi
    echo "setup_peer_env: torch $found after '$1'"
}

python3 -m venv "$VENV"
"$PIP" install --quiet "torch==$TORCH_VERSION"
check_torch "torch"
"$PIP" install --quiet "torch==$TORCH_VERSION" accelerate einops einconv opt-einsum safetensors \
    diffusers scikit-learn tqdm scipy
check_torch "accelerate einops einconv opt-einsum safetensors diffusers scikit-learn tqdm scipy"
"$PIP" install --quiet --no-deps kronfluence
check_torch "kronfluence (--no-deps)"
"$PIP" install --quiet --no-deps -e .
check_torch "fastinf (-e, --no-deps)"
"$VENV/bin/python" -c "import kronfluence, fastinf; print('setup_peer_env: kronfluence', \
kronfluence.__version__ if hasattr(kronfluence, '__version__') else '?', 'imports with fastinf')"
