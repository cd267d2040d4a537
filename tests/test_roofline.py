"""The TPU compiler on this CPU (libtpu, `pip install -e .[tpu]`): `unijax.training.roofline` against
programs whose costs are known by hand, and `plan --topology` on the tiny stage-2 step.

Exact: FLOPs of dots inside loops (counted per trip), ring collective bytes. The roofline time of a
loop-free matmul is checked against the TPU compiler's own `optimal_seconds` within a factor of 2 (the
compiler models the MXU's efficiency, the roofline does not)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from configs import stage2
from unijax import plan as planner
from unijax.training import roofline

M, K, LAYERS = 512, 1024, 8


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.asarray(planner.topology_devices("v5e:2x2")).reshape(2, 2), ("data", "fsdp"))


def cost(mesh, f, *args):
    compiled = jax.jit(f).lower(*args).compile()
    return roofline.summary(roofline.analyse(compiled.as_text(), "tpu_v5e", 4), "tpu_v5e", roofline.compiler_cost(compiled))


def spec(mesh, shape, dtype, *axes):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*axes)))


def test_a_loop_free_matmul_matches_the_compiler(mesh):
    x, w = spec(mesh, (4 * M, K), jnp.bfloat16, ("data", "fsdp")), spec(mesh, (K, K), jnp.bfloat16)
    c = cost(mesh, lambda x, w: x @ w, x, w)
    assert c["flops_per_device"] == 2 * M * K * K == c["compiler_flops"]
    assert c["compiler_estimate_valid"] and c["loop_trips_max"] == 1
    assert 0.5 < c["compute_seconds"] / c["compiler_optimal_seconds"] < 2.0


def test_batched_matmuls_and_their_gradients_match_the_compiler(mesh):
    """The TPU compiler writes attention's batched einsums as dilated convolutions: counted exactly."""
    q = spec(mesh, (8, 4, 2, M, 128), jnp.bfloat16, ("data", "fsdp"))
    k = spec(mesh, (8, 4, M, 128), jnp.bfloat16, ("data", "fsdp"))

    def scores(q, k):
        return jnp.einsum("bkgtd,bksd->bkgts", q, k).astype(jnp.float32).sum()

    c = cost(mesh, jax.grad(scores, argnums=(0, 1)), q, k)
    assert c["flops_per_device"] == c["compiler_flops"] == 2 * 2 * (8 * 4 * 2 * M * M * 128) / 4


def test_loops_count_per_trip(mesh):
    """A 16-trip fori loop and a scanned 8-layer stack with its backward: the compiler counts each
    body once; the roofline counts every trip."""
    x, w = spec(mesh, (4 * M, K), jnp.bfloat16, ("data", "fsdp")), spec(mesh, (K, K), jnp.bfloat16)
    c = cost(mesh, lambda x, w: jax.lax.fori_loop(0, 16, lambda i, h: jnp.tanh(h @ w), x), x, w)
    assert c["flops_per_device"] == 16 * 2 * M * K * K and c["loop_trips_max"] == 16
    assert c["compiler_flops"] < 2 * 2 * M * K * K and not c["compiler_estimate_valid"]

    def stack(ws, x, unroll=1):
        h, _ = jax.lax.scan(lambda h, w_: (jnp.tanh(h @ w_), None), x, ws, unroll=unroll)
        return jnp.sum(h)

    ws, x2 = spec(mesh, (LAYERS, K, K), jnp.bfloat16, None, "fsdp"), spec(mesh, (M, K), jnp.bfloat16, "data")
    c = cost(mesh, jax.grad(stack), ws, x2)
    # forward, input and weight gradients of 8 layers on this device's quarter of the math
    assert c["flops_per_device"] == 3 * LAYERS * 2 * M * K * K / 4
    # unrolled by 2: four trips of two layers, the counter steps by 2
    c = cost(mesh, jax.grad(lambda ws, x: stack(ws, x, 2)), ws, x2)
    assert c["flops_per_device"] == 3 * LAYERS * 2 * M * K * K / 4


def test_a_conditional_counts_its_costliest_branch(mesh):
    """`lax.cond` between one matmul and three chained ones inside a 4-trip loop: counted as the three
    taken on every trip (XLA's upper bound), and reported as conditional FLOPs."""
    x, w = spec(mesh, (4 * M, K), jnp.bfloat16, ("data", "fsdp")), spec(mesh, (K, K), jnp.bfloat16)

    def f(x, w):
        def body(i, h):
            return jax.lax.cond(jnp.sum(h) > 0, lambda h: jnp.tanh(jnp.tanh(jnp.tanh(h @ w) @ w) @ w),
                                lambda h: jnp.tanh(h @ w), h)
        return jax.lax.fori_loop(0, 4, body, x)

    c = cost(mesh, f, x, w)
    assert c["flops_per_device"] == c["conditional_flops_per_device"] == 4 * 3 * 2 * M * K * K


def test_a_scan_reads_and_writes_its_slices_not_the_stacked_arrays(mesh):
    """A layer scan reads one layer's weights and writes one layer's output per trip (dynamic slice /
    in-place dynamic update slice): HBM traffic grows with the layers, not with layers squared."""
    ws, x = spec(mesh, (LAYERS, K, K), jnp.bfloat16), spec(mesh, (M, K), jnp.bfloat16, "data")

    def stack(ws, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w),) * 2, x, ws)[1]

    c = cost(mesh, stack, ws, x)
    per_layer = K * K * 2 + 2 * (M // 2) * K * 2  # weight read, activation read + write (bf16, half the rows)
    assert c["hbm_bytes_per_device"] < 3 * LAYERS * per_layer


def test_collective_bytes_are_ring_bytes(mesh):
    """Gathering a [2048, 1024] float32 array split 4 ways: each device receives 3/4 of it."""
    x = spec(mesh, (4 * M, K), jnp.float32, ("data", "fsdp"))
    c = cost(mesh, lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P())) * 2, x)
    assert c["collective_bytes_by_kind"] == {"all-gather": 3 / 4 * 4 * M * K * 4}
    assert c["collective_seconds"] == pytest.approx(c["collective_bytes_per_device"] / 200e9)


def test_a_custom_call_without_cost_makes_the_compiler_estimate_negative(mesh):
    """`jax.lax.ragged_dot` on TPU runs a metadata kernel with no cost estimate: the compiler's
    `optimal_seconds` comes out negative; the roofline reads the grouped matmul's own estimate."""
    x, w = spec(mesh, (8 * M, K), jnp.bfloat16, ("data", "fsdp")), spec(mesh, (K, K), jnp.bfloat16)

    def grouped(x, w):
        return jax.lax.ragged_dot(x, jnp.stack([w] * 8), jnp.full((8,), M // 4, jnp.int32))

    with jax.default_matmul_precision("default"):  # the suite's "highest" asks the bf16 kernel for fp32 passes
        c = cost(mesh, grouped, x, w)
    assert c["compiler_optimal_seconds"] < 0 and not c["compiler_estimate_valid"]
    assert c["custom_calls_of_unknown_cost"] >= 1
    assert c["flops_per_device"] > 0 and c["compute_seconds"] > 0


def test_plan_compiles_the_tiny_stage2_step_for_a_tpu_slice(tmp_path):
    """TA-MoE + LoRA + AIA, scanned and rematerialised, frozen weights in bf16, for v5e:2x2 with the
    TPU compiler."""
    c = stage2.get_config("aia")
    c.model.scan_layers, c.model.remat_policy = True, "full"
    c.model.text.num_layers = 2
    c.model.dtype, c.train.batch_size, c.train.frozen_dtype = "bfloat16", 8, "bfloat16"
    with jax.default_matmul_precision("default"):  # Mosaic rejects the suite's "highest" on bf16 operands
        r = planner.plan(c, dict(data=2, fsdp=2), topology="v5e:2x2", hlo_path=str(tmp_path / "step.hlo"))
    assert r["chip"] == "tpu_v5e" and r["topology"] == "v5e:2x2" and "TPU v5 lite" in r["devices"]
    assert r["fits"] and 0 < r["peak_bytes_per_device"] < 16e9
    k = r["compiled_cost"]
    assert k["loop_trips_max"] >= 2 and not k["loops_of_unknown_trips"]
    # splash attention and megablox are selected on TPU, and every kernel's FLOPs are known
    hlo = (tmp_path / "step.hlo").read_text()
    assert "splash_mha_fwd" in hlo and "splash_mha_dkv" in hlo and "jit(gmm)" in hlo and "jit(tgmm)" in hlo
    assert not k["custom_calls_of_unknown_cost"] and not k["compiler_estimate_valid"]  # the layer scan: counted once
    assert r["collective_bytes_per_device"] > 0 and "all-reduce" in k["collective_bytes_by_kind"]
    assert r["step_time_source"] == "roofline" and r["optimal_seconds"] > 0
    assert 0 < r["estimated_mfu"] < 1 and r["useful_flops"] > 0 and r["model_flops"] > 0
    text = planner.table(r)
    assert "collectives:" in text and "estimated MFU" in text
