#!/bin/bash
# GPU host helper (from ../shared/gpu): source it to install .wheelhouse/*.whl into /tmp/site.
# Source this on the GPU host from the folder that holds .wheelhouse:
#   source install_wheelhouse.sh [DEST]
# Installs the wheels into /tmp/site (no index, no dependency resolution) and exports the paths.
DEST=${1:-.wheelhouse}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$DEST"/*.whl || return 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
# Hopper images may set TORCH_CUDA_ARCH_LIST=9.0a; DeepSpeed's op builder cannot parse '9.0a'
# (ValueError: invalid literal for int() ... '0a') when it JIT-compiles FusedAdam and friends.
export TORCH_CUDA_ARCH_LIST=9.0
