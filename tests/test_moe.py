"""TA-MoE (unijax.models.moe) against a float64 numpy reference of the layer, a dense jnp reference for
gradients, a numpy simulation of the capacity priority rule, and the 1-device layer on expert-parallel meshes.

Reference: every expert is computed densely, routing decisions (group, top-k inside the group) are taken in
float64 numpy, and the chosen experts are mixed with their renormalised gates. Tolerances are float32 ones
(matmul precision `highest`, conftest): values rtol 1e-5 / atol 1e-5, gradients rtol 1e-4 / atol 1e-5 on
unit-scale activations and weights.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unijax import sharding
from unijax.models.config import JanusConfig, MoEConfig, TextConfig
from unijax.models.moe import TAMoE

B, T, E, M, N, K = 8, 4, 16, 12, 4, 2  # batch, seq, embed, expert mlp, experts per group, top_k
S, NX = B * T, 2 * N
ALPHA = 0.7
NO_DROP = 100.0  # capacity factor large enough that C = tokens per dispatch group
RTOL, ATOL = 1e-5, 1e-5  # forward values
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5
MODES = ("label", "router", "soft")
IMPLS = ("capacity", "dropless")
MESHES = {"expert2": {"expert": 2}, "data2_expert4": {"data": 2, "expert": 4},
          "data2_fsdp2_expert2": {"data": 2, "fsdp": 2, "expert": 2}}


# -- setup ---------------------------------------------------------------------------------------
def config(mode="label", impl="capacity", capacity_factor=NO_DROP):
    moe = MoEConfig(num_experts_per_group=N, top_k=K, expert_intermediate_size=M, group_assignment=mode,
                    impl=impl, capacity_factor=capacity_factor, alpha_init=ALPHA)
    return JanusConfig(text=TextConfig(hidden_size=E, intermediate_size=M), ffn="ta_moe", moe=moe)


def random_params(seed=0):
    """Unit-scale weights (the 0.02 init makes routing near-uniform and expert outputs tiny)."""
    g = np.random.default_rng(seed)

    def w(*shape, scale=1.0):
        return (scale * g.standard_normal(shape) / math.sqrt(shape[-2])).astype(np.float32)

    return {"task_router": {"kernel": w(E, 2, scale=2.0)}, "router": {"kernel": w(E, NX, scale=2.0)},
            "experts": {"gate_proj": w(NX, E, M), "up_proj": w(NX, E, M), "down_proj": w(NX, M, E)},
            "shared": {"gate_proj": {"kernel": w(E, M)}, "up_proj": {"kernel": w(E, M)},
                       "down_proj": {"kernel": w(M, E)}},
            "alpha": np.asarray(ALPHA, np.float32)}


def batch(seed=1):
    """x `[B, T, E]`, task `[B, T]` (0 MMU, 1 T2I), valid `[B, T]` with 6 padding tokens."""
    g = np.random.default_rng(seed)
    x = g.standard_normal((B, T, E)).astype(np.float32)
    task = g.integers(0, 2, (B, T)).astype(np.int32)
    valid = np.ones((B, T), bool)
    valid[1, -1] = valid[4, -1] = valid[6, 1:] = valid[7, 0] = False
    return x, task, valid


def cotangents(seed=2):
    """Random cotangents for y `[B, T, E]` and the task logits `[B, T, 2]`."""
    g = np.random.default_rng(seed)
    return g.standard_normal((B, T, E)).astype(np.float32), g.standard_normal((B, T, 2)).astype(np.float32)


def layer(**kw):
    """(graphdef, abstract state) of a TA-MoE built without running its initialisers."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: TAMoE(config(**kw), rngs=nnx.Rngs(0))))
    shapes = jax.tree.map(lambda a: tuple(a.shape), nnx.to_pure_dict(state))
    assert shapes == jax.tree.map(np.shape, random_params()), "random_params does not match the layer"
    return graphdef, state


def loss_terms(y, aux, cts):
    """A scalar touching every output the training loss uses: y, task logits, balance and z losses."""
    ct_y, ct_tl = cts
    return jnp.sum(y * ct_y) + jnp.sum(aux["task_logits"] * ct_tl) + 0.3 * aux["balance"] + 0.1 * aux["z"]


# XLA:CPU spends seconds in LLVM on each of these tiny programs; its optimisation passes do not change the
# HLO (fusion, SPMD partitioning) nor the float32 results beyond rounding, so they are turned off.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def value_and_grads(graphdef):
    """(params, x, task, valid, cts) -> ((loss, (y, aux)), (d params, d x)) of the layer."""
    def f(p, x, task, valid, cts):
        y, aux = nnx.merge(graphdef, p)(x, task, valid)
        return loss_terms(y, aux, cts), (y, aux)
    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)


@functools.cache
def one_device(impl):
    """{mode: (y, aux, grads)} of the layer without a mesh, cached: several tests read them. One program
    for the three group modes: compiling, not running, is what takes time here."""
    fns = {mode: value_and_grads(layer(mode=mode, impl=impl)[0]) for mode in MODES}
    params = jax.tree.map(jnp.asarray, random_params())
    out = jit(lambda p, *a: {mode: f(p, *a) for mode, f in fns.items()})(params, *batch(), cotangents())
    return {mode: jax.device_get((y, aux, grads)) for mode, ((_, (y, aux)), grads) in out.items()}


# -- float64 numpy reference ---------------------------------------------------------------------
def softmax(a, axis=-1):
    e = np.exp(a - a.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def route_ref(p, x, task, mode):
    """Routing decisions in float64: expert ids `[S, K']` (K' = K, 2K for soft; first choices first) and
    group `[S]`. Asserts the decisions have a margin, so float32 cannot take different ones."""
    xf = x.reshape(S, E).astype(np.float64)
    tl = xf @ p["task_router"]["kernel"].astype(np.float64)
    probs = softmax((xf @ p["router"]["kernel"].astype(np.float64)).reshape(S, 2, N))
    if mode == "label":
        group = task.reshape(S).astype(np.int64)
    else:
        group = np.argmax(tl, -1)
        assert np.abs(tl[:, 0] - tl[:, 1]).min() > 1e-4
    ids = []
    for gs in ([np.zeros(S, np.int64), np.ones(S, np.int64)] if mode == "soft" else [group]):
        pg = probs[np.arange(S), gs]                                            # [S, N]
        order = np.argsort(-pg, axis=-1, kind="stable")
        assert np.min(-np.diff(np.take_along_axis(pg, order[:, : K + 1], -1), axis=-1)) > 1e-5
        ids.append(order[:, :K] + gs[:, None] * N)
    return np.concatenate(ids, axis=1), group


def keep_ref(ids, valid, groups=1, cap=None):
    """The capacity priority rule, in each of `groups` equal runs of tokens: all first choices in token order,
    then all second choices...; an expert keeps its first `cap` assignments. -> (kept `[S, K']`, dropped)."""
    valid = valid.reshape(S)
    kk = ids.shape[1]
    keep = np.zeros(ids.shape, bool)
    sg = S // groups
    for g in range(groups):
        count = np.zeros(NX, np.int64)
        for k in range(kk):
            for s in range(g * sg, (g + 1) * sg):
                if valid[s]:
                    keep[s, k] = cap is None or count[ids[s, k]] < cap
                    count[ids[s, k]] += 1
    return keep, int(np.sum(valid[:, None] & ~keep))


def apply_ref(xp, p, x, ids, keep, group, valid, mode):
    """The layer given its routing decisions, for `xp` = numpy (float64 values) or jax.numpy (gradients):
    every expert densely, mixed by renormalised gates on the kept assignments. -> (y `[B, T, E]`, aux)."""
    f64 = xp is np
    p = jax.tree.map(lambda a: a.astype(np.float64), p) if f64 else p
    xf = x.reshape(S, E).astype(np.float64) if f64 else x.reshape(S, E)
    w = valid.reshape(S).astype(xf.dtype)
    tl = xf @ p["task_router"]["kernel"]
    logits = (xf @ p["router"]["kernel"]).reshape(S, 2, N)
    lmax = logits.max(-1, keepdims=True)
    lse = xp.log(xp.exp(logits - lmax).sum(-1)) + lmax[..., 0]                 # [S, 2]
    probs = xp.exp(logits - lse[..., None])
    kk = ids.shape[1]
    vals = xp.take_along_axis(probs.reshape(S, 2 * N), ids, axis=1)            # [S, K']
    if mode == "soft":  # renormalised inside each group, times that group's task probability
        tp = xp.exp(tl - tl.max(-1, keepdims=True))
        tp = tp / tp.sum(-1, keepdims=True)
        v = vals.reshape(S, 2, K)
        gates = (v / v.sum(-1, keepdims=True) * tp[:, :, None]).reshape(S, kk)
    else:
        gates = vals / vals.sum(-1, keepdims=True)
    onehot = (ids[..., None] == np.arange(NX)).astype(xf.dtype)                # [S, K', X]
    combine = xp.sum(onehot * (gates * keep * w[:, None])[..., None], axis=1)  # [S, X]

    ex = p["experts"]
    a = xp.einsum("se,xem->sxm", xf, ex["gate_proj"])
    b = xp.einsum("se,xem->sxm", xf, ex["up_proj"])
    every = xp.einsum("sxm,xme->sxe", a / (1 + xp.exp(-a)) * b, ex["down_proj"])  # [S, X, E]
    sh = p["shared"]
    a, b = xf @ sh["gate_proj"]["kernel"], xf @ sh["up_proj"]["kernel"]
    shared = (a / (1 + xp.exp(-a)) * b) @ sh["down_proj"]["kernel"]
    y = xp.einsum("sx,sxe->se", combine, every) + p["alpha"] * shared

    # auxiliaries over valid tokens; `load` counts assignments (kept or dropped)
    chosen = np.sum(onehot, axis=1) * np.asarray(valid).reshape(S)[:, None]    # [S, X], constant
    in_group = (np.asarray(group)[:, None] == np.arange(2)) * np.asarray(valid).reshape(S)[:, None]  # [S, 2]
    n_g = in_group.sum(0)
    present = n_g > 0
    balance = 0.0
    for g in np.flatnonzero(present):
        f = chosen[in_group[:, g], g * N:(g + 1) * N].sum(0) / (n_g[g] * K)   # fraction of assignments
        pm = probs[in_group[:, g], g].sum(0) / n_g[g]                        # mean router probability
        balance = balance + N * xp.sum(f * pm) / present.sum()
    lse_g = xp.take_along_axis(lse, np.asarray(group)[:, None], axis=1)[:, 0]
    z = xp.sum(w * lse_g**2) / w.sum()
    aux = {"task_logits": tl.reshape(B, T, 2), "balance": balance, "z": z, "load": chosen.sum(0),
           "alpha": p["alpha"]}
    return y.reshape(B, T, E), aux


def reference(p, x, task, valid, mode, groups=1, cap=None):
    """-> (y, aux, routing): the float64 layer; routing holds ids, group and the kept assignments."""
    ids, group = route_ref(p, x, task, mode)
    ids = np.where(valid.reshape(S, 1), ids, 0)  # padding: any id, its gates are masked
    keep, dropped = keep_ref(ids, valid, groups, cap)
    y, aux = apply_ref(np, p, x, ids, keep, group, valid, mode)
    return y, dict(aux, dropped=dropped), {"ids": ids, "group": group, "keep": keep}


def assert_close(got_y, got_aux, want_y, want_aux, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(got_y, want_y, rtol=rtol, atol=atol, err_msg="y")
    for key, want in want_aux.items():
        np.testing.assert_allclose(got_aux[key], want, rtol=rtol, atol=atol, err_msg=f"aux[{key!r}]")


# -- 1. forward against the float64 reference ---------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
def test_forward_matches_float64_reference(mode, impl):
    """y and every aux value (task logits, balance, z, load, dropped, alpha): rtol/atol 1e-5.
    `capacity` runs with C = all tokens, so nothing drops and both impls equal the dense mixture."""
    y, aux, _ = one_device(impl)[mode]
    x, task, valid = batch()
    want_y, want_aux, routing = reference(random_params(), x, task, valid, mode)
    assert want_aux["dropped"] == 0
    assert_close(y, aux, want_y, want_aux)
    # the data is not degenerate: both groups present, every expert used, padding takes no expert
    assert set(routing["group"][valid.reshape(S)]) == {0, 1}
    assert np.all(want_aux["load"] > 0)
    assert np.sum(want_aux["load"]) == valid.sum() * (2 * K if mode == "soft" else K)


# -- 2. gradients against a dense jnp reference -------------------------------------------------
@functools.cache
def dense_reference_grads():
    """{mode: gradients of `loss_terms` through `apply_ref` in jax.numpy}: every expert computed densely,
    mixed with one-hot masks of the float64 routing decisions (gates and aux stay differentiable)."""
    p, (x, task, valid) = random_params(), batch()
    routings = {mode: reference(p, x, task, valid, mode)[2] for mode in MODES}

    def loss(p_, x_, mode):
        r = routings[mode]
        return loss_terms(*apply_ref(jnp, p_, x_, r["ids"], r["keep"], r["group"], valid, mode), cotangents())

    grads = jit(lambda p_, x_: {mode: jax.grad(loss, argnums=(0, 1))(p_, x_, mode) for mode in MODES})
    return jax.device_get(grads(jax.tree.map(jnp.asarray, p), jnp.asarray(x)))


def assert_grads_close(got, want):
    for (path, w), g in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
        where = jax.tree_util.keystr(path)
        assert np.max(np.abs(w)) > 0, f"zero reference gradient at {where}"
        np.testing.assert_allclose(g, w, rtol=GRAD_RTOL, atol=GRAD_ATOL, err_msg=where)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_dense_reference(mode, impl):
    """d loss / d (x, every parameter): rtol 1e-4, atol 1e-5."""
    _, _, grads = one_device(impl)[mode]
    assert_grads_close(grads, dense_reference_grads()[mode])


# -- 3. capacity: the priority rule and what a drop means -----------------------------------------
def forward_once(graphdef, params, *args, exact=False):
    return jit(lambda p, *a: nnx.merge(graphdef, p)(*a, exact=exact))(params, *args)


def assert_only_shared(y, p, x, task, valid, mode, routing, mask):
    """Tokens in `mask` [S] get alpha * shared(x) and nothing from the experts."""
    none = np.zeros_like(routing["keep"])
    shared, _ = apply_ref(np, p, x, routing["ids"], none, routing["group"], valid, mode)
    np.testing.assert_allclose(np.asarray(y).reshape(S, E)[mask], shared.reshape(S, E)[mask], rtol=RTOL,
                               atol=ATOL)


@pytest.mark.parametrize("mode,factor", [("label", 0.5), ("soft", 0.25)])
def test_capacity_drops_follow_the_priority_rule(mode, factor):
    """One dispatch group: C = ceil(factor * 32 tokens * K' / 8 experts) = 4 with K' = 2 (label) or 4 (soft,
    top-k in both groups). `dropped` equals the numpy simulation (first choices of every token, in token
    order, then second choices...), y equals the reference with the dropped assignments removed (rtol/atol
    1e-5), and a token with no kept assignment gets only alpha * shared(x)."""
    p, (x, task, valid) = random_params(), batch()
    graphdef, _ = layer(mode=mode, impl="capacity", capacity_factor=factor)
    y, aux = forward_once(graphdef, p, x, task, valid)
    kk = 2 * K if mode == "soft" else K
    want_y, want_aux, routing = reference(p, x, task, valid, mode, cap=math.ceil(factor * S * kk / NX))
    assert 0 < want_aux["dropped"] < valid.sum() * kk
    assert int(aux["dropped"]) == want_aux["dropped"]
    assert_close(y, aux, want_y, want_aux)
    nothing_kept = ~routing["keep"].any(1)  # padding included
    assert nothing_kept[valid.reshape(S)].any(), "no valid token lost all its assignments; lower the factor"
    assert_only_shared(y, p, x, task, valid, mode, routing, nothing_kept)


def test_exact_capacity_drops_nothing():
    """`exact=True` (decoding) gives every expert room for all tokens, whatever capacity_factor says."""
    p, (x, task, valid) = random_params(), batch()
    graphdef, _ = layer(mode="label", impl="capacity", capacity_factor=0.5)
    y, aux = forward_once(graphdef, p, x, task, valid, exact=True)
    want_y, want_aux, _ = reference(p, x, task, valid, "label")
    assert_close(y, aux, want_y, want_aux)


# -- 4. expert parallelism ----------------------------------------------------------------------
def mesh_of(name):
    shape = MESHES[name]
    return sharding.make_mesh(shape, jax.devices()[: math.prod(shape.values())])


def place(name, state):
    """(mesh, params sharded by the logical-axis rules, (x, task, valid, cts) sharded over the batch axes)."""
    mesh = mesh_of(name)
    params = jax.device_put(random_params(), nnx.to_pure_dict(sharding.state_shardings(state, mesh)))
    args = jax.device_put((*batch(), cotangents()), sharding.batch_sharding(mesh))
    return mesh, params, args


@functools.cache
def on_mesh(name, impl):
    """(compiled, (y, aux, grads)) of the layer's value and gradients, jitted under mesh `name`."""
    graphdef, state = layer(mode="label", impl=impl)
    mesh, params, args = place(name, state)
    with jax.set_mesh(mesh):
        compiled = jit(value_and_grads(graphdef)).lower(params, *args).compile()
        (_, (y, aux)), grads = compiled(params, *args)
    return compiled, jax.device_get((y, aux, grads))


@pytest.mark.parametrize("name,impl", [(m, "capacity") for m in MESHES] + [("data2_expert4", "dropless")])
def test_expert_parallel_matches_one_device(name, impl):
    """Sharded params and batch, capacity with C = all tokens of a dispatch group (one group per batch
    shard): y and aux within rtol/atol 1e-5, gradients within rtol 1e-4 / atol 1e-5 of one device."""
    _, (y, aux, grads) = on_mesh(name, impl)
    want_y, want_aux, want_grads = one_device(impl)["label"]
    assert_close(y, aux, want_y, want_aux)
    assert_grads_close(grads, want_grads)


def test_capacity_drops_per_dispatch_group_on_a_mesh():
    """data=2 x expert=4: 8 dispatch groups of one batch row (4 tokens), C = ceil(0.5 * 4 * 2 / 8) = 1 per
    group, so drops differ from one device; they equal the numpy simulation run group by group."""
    p, (x, task, valid) = random_params(), batch()
    graphdef, state = layer(mode="label", impl="capacity", capacity_factor=0.5)
    mesh, params, (x_, task_, valid_, _) = place("data2_expert4", state)
    with jax.set_mesh(mesh):
        y, aux = forward_once(graphdef, params, x_, task_, valid_)
    want_y, want_aux, routing = reference(p, x, task, valid, "label", groups=8, cap=1)
    assert int(aux["dropped"]) == want_aux["dropped"]
    assert want_aux["dropped"] != reference(p, x, task, valid, "label", cap=4)[1]["dropped"]  # 1 group, C = 4
    assert_close(y, aux, want_y, want_aux)
    assert_only_shared(y, p, x, task, valid, "label", routing, ~routing["keep"].any(1))


# -- 5. the compiled expert-parallel program -----------------------------------------------------
def collectives(hlo):
    """(kind, result type) of every collective instruction in an HLO module's text."""
    found = re.findall(r"^\s*%\S+ = (.*?) (all-gather|all-to-all|all-reduce|collective-permute|reduce-scatter)\(",
                       hlo, flags=re.M)
    return [(kind, result) for result, kind in found]


def test_expert_weights_stay_sharded_in_the_compiled_program():
    """data=2 x expert=4, capacity, forward + backward as compiled by XLA: the 8 experts' weights enter and
    their gradients leave as 2 experts per device, the full `[8, embed, mlp]` stacks never exist (no gather
    of expert weights), and an all-to-all (over the expert axis) moves `[..., embed]` capacity buffers."""
    compiled, _ = on_mesh("data2_expert4", "capacity")
    param_shardings = compiled.input_shardings[0][0]["experts"]
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert param_shardings[name].spec[0] == "expert" and not param_shardings[name].is_fully_replicated, name
    hlo = compiled.as_text()
    entry = next(line for line in hlo.splitlines() if line.startswith("ENTRY"))
    inputs, outputs = entry.split("->")
    local = NX // 4
    for side in (inputs, outputs):  # gate_proj, up_proj [2, E, M]; down_proj [2, M, E]
        assert side.count(f"f32[{local},{E},{M}]") == 2 and side.count(f"f32[{local},{M},{E}]") == 1, side
    assert f"f32[{NX},{E},{M}]" not in hlo and f"f32[{NX},{M},{E}]" not in hlo
    all_to_all = [result for kind, result in collectives(hlo) if kind == "all-to-all"]
    assert any(re.search(rf"f32\[[\d,]*,{E}\]", result) for result in all_to_all), all_to_all


def test_dispatch_does_not_all_gather_the_activations():
    """No collective brings every token's activations (`[..., embed]` floats) to every device."""
    compiled, _ = on_mesh("data2_expert4", "capacity")
    gathered = [result for kind, result in collectives(compiled.as_text())
                if kind == "all-gather" and re.match(rf"f32\[[\d,]*,{E}\]", result)]
    assert not gathered, gathered
