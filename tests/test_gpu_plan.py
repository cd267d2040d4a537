"""`plan --topology h100:...`: the GPU compiler, compile-only, on this CPU host, through jax's CUDA
plugin in the side environment of `launch/gpu_plan_env.sh` (built on first use; the checks run there,
in `tests/gpu_checks.py`).

Exact against hand counts: the FLOPs of a matmul and its gradients (Triton GEMM fusions, and cuBLAS
with Triton GEMMs off), of cuDNN's causal fused attention forward + backward and of cuDNN
convolutions in all three directions; the bytes of an all-gather across two hosts (all of them over
the network) and within each host (none). The tiny stage-2 step (TA-MoE + LoRA + AIA, scanned, remat,
bf16) compiles for two hosts of four H100s, with cuDNN attention and no call of unknown cost.
"""

import json
import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checks():
    python = subprocess.run(["bash", "launch/gpu_plan_env.sh"], cwd=REPO, capture_output=True, text=True, check=True)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([str(REPO / python.stdout.strip()), "tests/gpu_checks.py"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name, call", [("matmul", None), ("matmul_cublas", "__cublas$lt$matmul"),
                                        ("attention", "__cudnn$fmhaSoftmaxBackward"),
                                        ("conv", "__cudnn$convBackwardFilter")])
def test_library_calls_are_counted_exactly(checks, name, call):
    c = checks[name]
    assert c["flops"] == c["want"] and c["unknown"] == 0
    assert call is None or call in c["calls"]


def test_collectives_between_hosts_take_the_network(checks):
    g, size = checks["all_gather"], checks["all_gather"]["size"]
    assert g["across_hosts"]["bytes"] == g["across_hosts"]["between_hosts"] == 7 / 8 * size
    assert g["within_a_host"]["bytes"] == 3 / 4 * size and g["within_a_host"]["between_hosts"] == 0
    # 50 GB/s of InfiniBand per GPU against 450 GB/s of NVLink
    assert g["across_hosts"]["seconds"] == pytest.approx(7 / 8 * size / 50e9)
    assert g["within_a_host"]["seconds"] == pytest.approx(3 / 4 * size / 450e9)


def test_plan_compiles_the_tiny_stage2_step_for_two_gpu_hosts(checks):
    r = checks["plan"]
    assert r["chip"] == "h100" and "H100" in r["devices"] and "GPU compiler" in r["devices"]
    assert r["fits"] and 0 < r["peak_bytes_per_device"] < 80e9
    assert "__cudnn$fmhaScaleBiasSoftmax" in r["calls"]  # attention_impl=auto picks cuDNN on GPU
    k = r["compiled_cost"]
    assert k["custom_calls_of_unknown_cost"] == 0 and not k["loops_of_unknown_trips"] and k["loop_trips_max"] >= 2
    assert 0 < k["collective_bytes_between_hosts_per_device"] < k["collective_bytes_per_device"]
    assert r["optimal_seconds"] > 0 and 0 < r["estimated_mfu"] < 1 and 0 < r["useful_over_compiled"] <= 1
