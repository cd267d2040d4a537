"""The dropless TA-MoE dispatch's kernels and sharding (unijax.models.moe.dropless, lora.grouped_matmul).

1. The local-per-device dropless dispatch (shard_map over the batch axes, experts sharded over `expert`,
   tokens moved by a ragged all-to-all: emulated with a dense all-to-all on CPU) equals `capacity` with
   room for every assignment, without a mesh and on 8 CPU devices: outputs and gradients w.r.t. x, the
   weights and per-expert LoRA adapters (float32, matmul precision `highest`: rtol/atol 1e-5).
2. Megablox's `gmm`/`tgmm` (Pallas, interpret mode on CPU) equal `jax.lax.ragged_dot`, values and grads.
3. Compiled for a TPU v5e 2x2 topology on this host: the layer's forward+backward uses the megablox
   kernel (`tpu_custom_call`), no all-gather/all-reduce carries an array of the global assignment count,
   and the backward's FLOPs per device are within 3x of the forward's.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from unijax import plan as planner
from unijax import sharding
from unijax.models import lora, moe
from unijax.models.config import JanusConfig, MoEConfig, TextConfig
from unijax.models.moe import TAMoE
from unijax.training import roofline

B, T, E, M, N, K, R = 8, 4, 16, 12, 4, 2, 3  # batch, seq, embed, expert mlp, experts per group, top_k, lora rank
NX = 2 * N
SCALE = 0.5
TOL = dict(rtol=1e-5, atol=1e-5)
MESHES = {"data2_expert4": {"data": 2, "expert": 4}, "fsdp2_expert4": {"fsdp": 2, "expert": 4},
          "data2_expert2_tensor2": {"data": 2, "expert": 2, "tensor": 2}}

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture
def gmm_backend():
    """Sets `lora.GMM_BACKEND` for one test, restored after."""
    old = lora.GMM_BACKEND
    yield lambda b: setattr(lora, "GMM_BACKEND", b)
    lora.GMM_BACKEND = old


# -- 1. dropless == capacity ------------------------------------------------------------------------
def config(impl, mode="label", e=E, m=M, n=N, dtype="float32"):
    moe_cfg = MoEConfig(num_experts_per_group=n, top_k=K, expert_intermediate_size=m, group_assignment=mode,
                        impl=impl, capacity_factor=100.0, alpha_init=0.7)
    return JanusConfig(text=TextConfig(hidden_size=e, intermediate_size=m), ffn="ta_moe", moe=moe_cfg,
                       dtype=dtype, param_dtype=dtype)


def graphdef_of(cfg):
    return nnx.split(nnx.eval_shape(lambda: TAMoE(cfg, rngs=nnx.Rngs(0))))


def random_inputs(seed=0):
    """(params, adapters, (x, task, valid), cotangents): unit-scale weights and non-zero adapters on the experts."""
    g = np.random.default_rng(seed)

    def w(*shape, scale=1.0):
        return (scale * g.standard_normal(shape) / math.sqrt(shape[-2])).astype(np.float32)

    params = {"task_router": {"kernel": w(E, 2, scale=2.0)}, "router": {"kernel": w(E, NX, scale=2.0)},
              "experts": {"gate_proj": w(NX, E, M), "up_proj": w(NX, E, M), "down_proj": w(NX, M, E)},
              "shared": {"gate_proj": {"kernel": w(E, M)}, "up_proj": {"kernel": w(E, M)},
                         "down_proj": {"kernel": w(M, E)}},
              "alpha": np.asarray(0.7, np.float32)}
    adapters = {"experts": {name: {"a": w(NX, din, R), "b": w(NX, R, dout)}
                            for name, (din, dout) in (("gate_proj", (E, M)), ("up_proj", (E, M)), ("down_proj", (M, E)))}}
    x = g.standard_normal((B, T, E)).astype(np.float32)
    task = g.integers(0, 2, (B, T)).astype(np.int32)
    valid = np.ones((B, T), bool)
    valid[1, -1] = valid[4, -1] = valid[6, 1:] = valid[7, 0] = False
    cts = (g.standard_normal((B, T, E)).astype(np.float32), g.standard_normal((B, T, 2)).astype(np.float32))
    return params, adapters, (x, task, valid), cts


def value_and_grads(graphdef):
    """(params, adapters, x, task, valid, cts) -> (y, task logits), d(params, adapters, x)."""
    def f(params, adapters, x, task, valid, cts):
        layer = nnx.merge(graphdef, params)
        lora.attach(layer, adapters, SCALE)
        y, aux = layer(x, task, valid)
        loss = jnp.sum(y * cts[0]) + jnp.sum(aux["task_logits"] * cts[1]) + 0.3 * aux["balance"] + 0.1 * aux["z"]
        return loss, (y, aux["task_logits"])
    return jax.grad(f, argnums=(0, 1, 2), has_aux=True)


def run(impl, mode="label", mesh_name=None):
    """((y, task logits), grads) of the layer with LoRA on its experts, without a mesh or on `mesh_name`
    (params sharded by the logical rules, adapters over `expert`, the batch over the batch axes)."""
    graphdef, state = graphdef_of(config(impl, mode))
    params, adapters, args, cts = random_inputs()
    fn = value_and_grads(graphdef)
    if mesh_name is None:
        grads, out = jit(fn)(params, adapters, *args, cts)
        return jax.device_get((out, grads))
    shape = MESHES[mesh_name]
    mesh = sharding.make_mesh(shape, jax.devices()[: math.prod(shape.values())])
    params = jax.device_put(params, nnx.to_pure_dict(sharding.state_shardings(state, mesh)))
    adapters = jax.device_put(adapters, NamedSharding(mesh, P("expert")))
    args, cts = jax.device_put((args, cts), sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        grads, out = jit(fn)(params, adapters, *args, cts)
    return jax.device_get((out, grads))


@functools.cache
def reference(mode="label"):
    """`capacity` with C = all tokens, one device: nothing drops, so it is the exact mixture."""
    return run("capacity", mode)


def assert_tree_close(got, want):
    paths = jax.tree_util.tree_flatten_with_path(want)[0]
    for (path, w), g in zip(paths, jax.tree.leaves(got)):
        np.testing.assert_allclose(g, w, err_msg=jax.tree_util.keystr(path), **TOL)


@pytest.mark.parametrize("mode", ["label", "soft"])
def test_dropless_equals_capacity_without_mesh(mode):
    """No mesh: the plain local computation (sort, ragged_dot, un-sort) == capacity; `soft` routes each
    token to k experts of both groups (2k assignments)."""
    assert_tree_close(run("dropless", mode), reference(mode))


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_dropless_on_a_mesh_equals_capacity(mesh_name):
    """8 CPU devices: each device sorts its own tokens' assignments, sends them to the expert shards by
    the (emulated) ragged all-to-all, and gets the outputs back; == one-device capacity."""
    assert_tree_close(run("dropless", "label", mesh_name), reference("label"))


def test_dropless_with_megablox_on_a_mesh_equals_capacity(gmm_backend):
    """The TPU code path, megablox kernels in interpret mode inside the shard_map: == capacity."""
    gmm_backend("megablox_interpret")
    assert_tree_close(run("dropless", "label", "data2_expert4"), reference("label"))


def test_dense_ragged_exchange_follows_ragged_all_to_all_semantics():
    """`moe.ragged_exchange` emulated (XLA:CPU has no ragged-all-to-all): device i's rows
    `in_off[j] : + send[j]` land at `out_off[j]` of device j's output; the receivers here place their
    peers in reverse order with a gap, other rows keep the output's values; == a numpy simulation."""
    ep, rows, cap = 4, 12, 30
    g = np.random.default_rng(3)
    send = g.integers(0, 4, (ep, ep))                                    # [from, to]
    in_off = np.stack([np.concatenate([[0], np.cumsum(s)[:-1]]) for s in send])
    out_off = np.zeros((ep, ep), np.int64)                               # [from, to]: where at `to`
    for j in range(ep):
        at = 1
        for i in reversed(range(ep)):
            out_off[i, j], at = at, at + send[i, j] + 1
    operand = g.standard_normal((ep, rows, 2)).astype(np.float32)
    output = np.full((ep, cap, 2), -7.0, np.float32)
    want = output.copy()
    for i in range(ep):
        for j in range(ep):
            want[j, out_off[i, j]: out_off[i, j] + send[i, j]] = operand[i, in_off[i, j]: in_off[i, j] + send[i, j]]
    mesh = jax.make_mesh((ep,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:ep])
    fn = jax.shard_map(lambda *a: moe.ragged_exchange(*(v[0] for v in a), axis="expert")[None], mesh=mesh,
                       in_specs=P("expert"), out_specs=P("expert"))
    got = jax.jit(fn)(operand, output, in_off, send, out_off, send.T)
    np.testing.assert_array_equal(np.asarray(got), want)


# -- 2. megablox == ragged_dot ------------------------------------------------------------------------
@pytest.mark.parametrize("m,k,n,sizes", [(37, 640, 12, (3, 0, 10, 7, 9)),  # rows padded, groups end early, k tiled by 128
                                         (24, 520, 8, (8, 8, 8))])           # k zero-padded to 640
def test_megablox_equals_ragged_dot(gmm_backend, m, k, n, sizes):
    """lora.ragged_dot with an `Adapted` weight (x W + s (x A) B, each group its own A, B): megablox in
    interpret mode == jax.lax.ragged_dot, values and gradients w.r.t. x, W, A, B; rows past the groups 0."""
    g = np.random.default_rng(0)
    groups = len(sizes)
    x = jnp.asarray(g.standard_normal((m, k)), jnp.float32)
    w = lora.Adapted(*(jnp.asarray(g.standard_normal(s) / math.sqrt(s[-2]), jnp.float32)
                       for s in ((groups, k, n), (groups, k, R), (groups, R, n))), None, SCALE, 0.0)
    gs = jnp.asarray(sizes, jnp.int32)
    ct = jnp.asarray(g.standard_normal((m, n)), jnp.float32)

    def f(x, w):
        y = lora.ragged_dot(x, w, gs, jnp.float32)
        return jnp.sum(y * ct), y

    out = {}
    for backend in ("ragged_dot", "megablox_interpret"):
        gmm_backend(backend)
        out[backend] = jax.device_get(jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True))(x, w))
    (grads, y), (want_grads, want_y) = out["megablox_interpret"], out["ragged_dot"]
    np.testing.assert_allclose(y, want_y, **TOL)
    assert not np.any(y[sum(sizes):])
    assert_tree_close(grads, want_grads)


# -- 3. compiled for TPU ----------------------------------------------------------------------------
TPU_MESHES = {"expert4": (1, 1, 4, 1), "data2_fsdp2": (2, 2, 1, 1)}
TB, TT, TE, TM = 4, 96, 256, 512  # 384 tokens, 768 assignments: no other array dimension is 768


@functools.cache
def tpu_devices():
    return planner.topology_devices("v5e:2x2")  # the TPU compiler (libtpu: the [tpu] extra, CI installs it)


def compile_for_tpu(mesh_shape, backward: bool) -> str:
    """HLO text of the layer (bf16, dropless, 4 v5e chips) compiled: its forward, or forward + backward."""
    mesh = jax.sharding.Mesh(np.asarray(tpu_devices()).reshape(mesh_shape), sharding.MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * 4)
    graphdef, state = graphdef_of(config("dropless", e=TE, m=TM, dtype="bfloat16"))
    with jax.set_mesh(mesh):
        shardings = nnx.to_pure_dict(sharding.state_shardings(state, mesh))
        params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              nnx.to_pure_dict(state), shardings)
        batch = NamedSharding(mesh, P(sharding.BATCH_AXES))
        x = jax.ShapeDtypeStruct((TB, TT, TE), jnp.bfloat16, sharding=batch)
        task = jax.ShapeDtypeStruct((TB, TT), jnp.int32, sharding=batch)

        def loss(p, x, task):
            y, aux = nnx.merge(graphdef, p)(x, task)
            return jnp.sum(y.astype(jnp.float32) ** 2) + aux["balance"]

        fn = jax.grad(loss, argnums=(0, 1)) if backward else loss
        # at the suite's `highest` precision: the kernels trace bf16 dots at `default` themselves
        return jax.jit(fn).lower(params, x, task).compile().as_text()


@pytest.mark.parametrize("mesh_name", list(TPU_MESHES))
def test_compiled_for_tpu_uses_megablox_and_no_global_collective(mesh_name):
    fwd = compile_for_tpu(TPU_MESHES[mesh_name], backward=False)
    both = compile_for_tpu(TPU_MESHES[mesh_name], backward=True)
    assert "tpu_custom_call" in both and "tpu_custom_call" in fwd
    global_rows = TB * TT * K
    for line in both.splitlines():
        op = re.search(r"\s(all-gather|all-reduce|reduce-scatter|all-gather-start|all-reduce-start)\(", line)
        if op:
            shapes = re.findall(r"\[([\d,]+)\]", line.split("=", 1)[1].split(op.group(1))[0])
            assert not any(str(global_rows) in s.split(",") for s in shapes), line
    flops = [roofline.summary(roofline.analyse(text, "tpu_v5e", 4), "tpu_v5e")["flops_per_device"] for text in (fwd, both)]
    assert flops[1] - flops[0] <= 3 * flops[0], flops
    # expert parallel: the worst-case receive buffer's kernels are marked, and the roofline counts the rows
    # they visit (1 in ep of the buffer), not the buffer
    ep = dict(zip(("data", "fsdp", "expert", "tensor"), TPU_MESHES[mesh_name]))["expert"]
    assert (f"grouped_rows_active_1_in_{ep}" in fwd) == (ep > 1)
    if ep > 1:
        whole = roofline.analyse(fwd.replace(f"grouped_rows_active_1_in_{ep}", "grouped_rows"), "tpu_v5e", 4).flops
        assert flops[0] < whole
