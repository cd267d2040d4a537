#!/usr/bin/env bash
# The side environment in which `python -m unijax.plan --topology h100:...` compiles for NVIDIA GPUs on
# a host without one: a venv over the repo's environment (--system-site-packages) plus jax's CUDA
# plugin and the cuDNN wheel (about 1.6 GB). It is separate because the plugin prints a traceback at
# every `import jax` on a host without CUDA. Prints the venv's python; does nothing if it is there.
#
#     bash launch/gpu_plan_env.sh                 # -> .venv-gpu-plan/bin/python
#     JAX_PLATFORMS=cpu .venv-gpu-plan/bin/python -m unijax.plan --config configs/janus_pro/stage2.py:7b+aia \
#         --mesh data=8,expert=8 --topology h100:8x8
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${UNIJAX_GPU_PLAN_VENV:-.venv-gpu-plan}"
if ! "$venv/bin/python" -c "import importlib.metadata as m; m.version('jax-cuda12-plugin')" >/dev/null 2>&1; then
  python3 -m venv --system-site-packages "$venv" >&2
  "$venv/bin/pip" install -q --no-deps jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2 \
    nvidia-cudnn-cu12==9.28.0.42 >&2
fi
echo "$venv/bin/python"
