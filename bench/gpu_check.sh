#!/usr/bin/env bash
# The GPU check on a bare NVIDIA machine (python3 + pip with network to PyPI): installs unijax with
# jax[cuda12]==0.10.2, then runs bench/gpu_check.py (cuDNN attention in the compiled model, 100M
# train-step tokens/s + MFU, TA-MoE capacity vs dropless). Run from anywhere:
#
#     bash bench/gpu_check.sh                      # results: $OUT/gpu_check.json, else bench/results/gpu_check.json
#     GPU_CHECK_MINIMAL=1 bash bench/gpu_check.sh  # skip torch / transformers / peft / test tools (faster install)
#     bash bench/gpu_check.sh --parts cudnn        # extra arguments go to bench/gpu_check.py
#
# Environment: VENV (default /tmp/unijax-gpu-venv; created when python3 -m venv works, else pip
# installs into the current python), CHECK_TIMEOUT_S (default 480, the check's own limit),
# GPU_CHECK_SKIP_INSTALL=1 (use the current environment as it is).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${OUT:-bench/results}"
mkdir -p "$LOG_DIR"
t0=$(date +%s)

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$LOG_DIR/nvidia_smi.txt" || true

PY=python3
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" != "1" ]; then
  VENV="${VENV:-/tmp/unijax-gpu-venv}"
  if [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" >/dev/null 2>&1; then
    PY="$VENV/bin/python"
  else
    echo "python3 -m venv failed: installing into $(command -v python3)"
  fi
  PIP=("$PY" -m pip install --disable-pip-version-check -q)
  if [ "${GPU_CHECK_MINIMAL:-0}" = "1" ]; then
    grep -vE '^(torch|transformers|peft|pytest|pytest-xdist|import-linter|ruff)([=<> ]|$)' requirements.txt > /tmp/gpu_check_requirements.txt
    "${PIP[@]}" -r /tmp/gpu_check_requirements.txt "jax[cuda12]==0.10.2" 2>&1 | tail -5 | tee "$LOG_DIR/pip.txt"
    "${PIP[@]}" --no-deps -e . 2>&1 | tail -3 | tee -a "$LOG_DIR/pip.txt"
  else
    "${PIP[@]}" -r requirements.txt -e . "jax[cuda12]==0.10.2" 2>&1 | tail -5 | tee "$LOG_DIR/pip.txt"
  fi
  echo "install: $(( $(date +%s) - t0 )) s"
fi

"$PY" -c "import jax; print('jax', jax.__version__, jax.default_backend(), jax.devices())" || {
  echo "jax does not start; see $LOG_DIR/pip.txt"; exit 2; }
timeout "${CHECK_TIMEOUT_S:-480}" "$PY" bench/gpu_check.py "$@" 2>&1 | tee "$LOG_DIR/gpu_check.log"
rc=${PIPESTATUS[0]}
echo "gpu_check.py exit $rc; total $(( $(date +%s) - t0 )) s"
exit "$rc"
