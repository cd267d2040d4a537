"""TA-MoE: the Task-Aware Mixture-of-Experts FFN (UniDecouple).

    y = h_experts(x) + alpha * shared(x)

Each token belongs to a *group*: understanding (MMU, group 0) or generation (T2I, group 1). A
task router (linear, 2 logits) predicts the group; `group_assignment` decides what is used:

- `label`:  the token's task from the batch (training default; the task router still learns it
            through `L_group`),
- `router`: the task router's argmax (what a model must do when the task is not given),
- `soft`:   both groups, weighted by the task router's probabilities.

Inside a group, a dynamic-assignment router (linear over that group's `N` experts) takes the
softmax over the group and keeps the top-k experts, gates renormalised over the chosen k. The
`2N` group experts are stored stacked, MMU experts first (`[2N, embed, mlp]`, logical axis
`experts`), so one dispatch serves both groups: group `g`'s local expert `i` is expert `g*N + i`.
The shared expert(s) are one SwiGLU whose inner width is `num_shared_experts x mlp` (equivalent
to that many experts summed), scaled by a learnable scalar `alpha`.

Two dispatch implementations (`impl`):

- `dropless`: assignments sorted by expert, grouped matmuls (`lora.grouped_matmul`: megablox's
  `gmm`/`tgmm` Pallas kernels on TPU, `jax.lax.ragged_dot` elsewhere). Exact, no token is dropped;
  the fast path on TPU, slow on CPU (about 15x a dense matmul of the same size). Local per device
  (`dropless`): under a mesh it runs in `jax.shard_map` over the batch axes, each device sorting
  only its own tokens' assignments; with an `expert` axis the experts are sharded over it and the
  sorted rows travel to their experts' devices and back by ragged all-to-all (MaxText's design).
  No collective has the global number of assignments.
- `capacity`: GShard-style. Tokens are split into dispatch groups (one per batch shard of the
  context mesh, 1 without a mesh); in each, every expert takes at most
  `C = ceil(capacity_factor * tokens * k / (2N))` assignments (all of them when decoding) (top-1 choices first, then by token
  order). Kept assignments are gathered into `[groups, experts, C, embed]` buffers, the experts
  run as batched dense matmuls, and outputs are gathered back. A dropped assignment contributes
  nothing (the token keeps its residual and the shared expert); drops are counted. Gathers, not
  one-hot einsums, so dispatch costs memory traffic, not FLOPs.

Expert parallelism (`capacity`): under a mesh, the capacity buffers are constrained to
`P(("data", "fsdp"), "expert")` on (group, expert) and the activations around them to the batch
sharding: the partitioner turns the change of layout into an all-to-all over the `expert` axis.
We use sharding constraints rather than `shard_map` so that the same code runs unchanged on any
mesh (expert = 1 included) and composes with fsdp/tensor sharding of the expert weights.

The layer returns `(y, aux)`; aux holds the task-router logits (for `L_group`), the Switch
load-balancing loss within each group, the router z-loss, per-expert loads (also split by the
tokens' task when `task` is given: `load_by_task [2, 2N]`) and the number of dropped assignments.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from unijax.models import lora
from unijax.models.config import MoEConfig
from unijax.models.layers import SwiGLU, dtype_of, linear
from unijax.sharding import BATCH_AXES, target_platform

Array = jax.Array



def resolved_impl(m: MoEConfig) -> str:
    """`moe.impl`, with `auto` resolved for the platform traced for (`sharding.target_platform`;
    see bench/moe.py)."""
    if m.impl != "auto":
        return m.impl
    return "dropless" if target_platform() == "tpu" else "capacity"


def _mesh_batch_groups() -> tuple[int, tuple[str, ...], bool]:
    """(dispatch groups, batch axes present, has expert axis) for the context mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1, (), False
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    return math.prod(mesh.shape[a] for a in axes), axes, mesh.shape.get("expert", 1) > 1


def _constrain(x: Array, spec) -> Array:
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


class Experts(nnx.Module):
    """`num` SwiGLU experts stacked on a leading `experts` axis. Adapter-aware: each expert's LoRA
    adapter (`lora.Adapted` weights) runs through the same dispatch, batched or ragged."""

    lora_weights = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, num: int, hidden: int, inner: int, *, rngs: nnx.Rngs, dtype="float32", param_dtype="float32",
                 std: float = 0.02):
        init = nnx.initializers.normal(std)
        pd = dtype_of(param_dtype)
        self.dtype = dtype_of(dtype)
        self.gate_proj = nnx.Param(init(rngs.params(), (num, hidden, inner), pd), out_sharding=("experts", "embed", "mlp"))
        self.up_proj = nnx.Param(init(rngs.params(), (num, hidden, inner), pd), out_sharding=("experts", "embed", "mlp"))
        self.down_proj = nnx.Param(init(rngs.params(), (num, inner, hidden), pd), out_sharding=("experts", "mlp", "embed"))

    def weights(self):
        """The three stacked weights as stored (arrays, or `lora.Adapted` while training with LoRA)."""
        return tuple(p.get_value() for p in (self.gate_proj, self.up_proj, self.down_proj))

    def batched(self, buf: Array) -> Array:
        """buf `[G, X, C, E]` (expert x's tokens in `buf[:, x]`) -> `[G, X, C, E]`."""
        g, u, d = self.weights()
        a = lora.einsum("gxce,xem->gxcm", buf, g, self.dtype)
        b = lora.einsum("gxce,xem->gxcm", buf, u, self.dtype)
        return lora.einsum("gxcm,xme->gxce", jax.nn.silu(a) * b, d, self.dtype)

    def ragged(self, xs: Array, group_sizes: Array) -> Array:
        """xs `[A, E]` sorted by expert, `group_sizes [X]` -> `[A, E]` (rows past the groups are 0)."""
        return grouped_ffn(self.weights(), xs, group_sizes, self.dtype)


def grouped_ffn(weights, xs: Array, group_sizes: Array, dtype) -> Array:
    """The stacked SwiGLU experts `weights = (gate [X, E, M], up, down [X, M, E])` (arrays or
    `lora.Adapted`) on xs `[A, E]` sorted by expert, `group_sizes [X]`: grouped matmuls
    (`lora.ragged_dot` -> `lora.grouped_matmul`: megablox on TPU) -> `[A, E]`, rows past the groups 0."""
    g, u, d = weights
    a = lora.ragged_dot(xs, g, group_sizes, dtype)
    b = lora.ragged_dot(xs, u, group_sizes, dtype)
    return lora.ragged_dot(jax.nn.silu(a) * b, d, group_sizes, dtype)


# -- dropless dispatch -------------------------------------------------------------------------------
# How tokens move to their experts' devices: "auto" (`jax.lax.ragged_all_to_all` when traced for TPU;
# XLA:CPU/GPU do not implement it) | "ragged" | "dense" (the same exchange as an all-to-all of
# worst-case `[expert shards, local assignments]` buffers: exact anywhere, expert-shards x the bytes).
RAGGED_A2A = "auto"


def _exclusive_cumsum(v: Array) -> Array:
    return jnp.cumsum(v) - v


def _inverse_permutation(order: Array) -> Array:
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def ragged_exchange(operand: Array, output: Array, input_offsets: Array, send_sizes: Array, output_offsets: Array,
                    recv_sizes: Array, axis: str) -> Array:
    """`jax.lax.ragged_all_to_all` over mesh axis `axis` (inside `shard_map`), natively or, per
    `RAGGED_A2A`, as an all-to-all of `[peers, rows]` buffers with the same result: this device's
    rows `input_offsets[j] : + send_sizes[j]` land at `output_offsets[j]` of peer j's `output`, and
    `recv_sizes[i]` rows arrive from peer i."""
    mode = RAGGED_A2A
    if mode == "auto":
        mode = "ragged" if target_platform() == "tpu" else "dense"
    sizes = [v.astype(jnp.int32) for v in (input_offsets, send_sizes, output_offsets, recv_sizes)]
    if mode == "ragged":
        return jax.lax.ragged_all_to_all(operand, output, *sizes, axis_name=axis)
    input_offsets, send_sizes, output_offsets, recv_sizes = sizes
    rows = operand.shape[0]
    i = jnp.arange(rows, dtype=jnp.int32)[None]                                    # [1, rows]
    src = jnp.clip(input_offsets[:, None] + i, 0, rows - 1)                        # [peers, rows]
    chunks = jnp.where((i < send_sizes[:, None])[..., None], operand[src], jnp.zeros((), operand.dtype))
    got = jax.lax.all_to_all(chunks, axis, 0, 0, tiled=True)                      # [peers (from), rows, ...]
    where = jax.lax.all_to_all(output_offsets, axis, 0, 0, tiled=True)            # where each peer's rows go
    dst = jnp.where(i < recv_sizes[:, None], where[:, None] + i, output.shape[0])  # past the end: dropped
    return output.at[dst.reshape(-1)].set(got.reshape(-1, *operand.shape[1:]), mode="drop")


ACTIVE_ROWS_SCOPE = "grouped_rows_active_1_in_"


def _to_experts_and_back(xs: Array, sizes: Array, weights, dtype, ep: int, axis: str) -> Array:
    """Expert parallelism inside `shard_map`: xs `[A, E]` (this device's assignments sorted by global
    expert, `sizes [X]`) -> the expert outputs `[A, E]` in the same order. This device holds experts
    `[i * X / ep, (i + 1) * X / ep)` (`i` its index on `axis`). Rows for expert shard j go to device j
    (one ragged all-to-all, at most `ep * A` rows received), are regrouped there by local expert,
    run through the local experts' grouped matmuls, put back in arrival order and returned (a
    second ragged all-to-all). Only `[ep, X / ep]` counts are exchanged besides the rows."""
    a, e = xs.shape
    xl = sizes.shape[0] // ep
    me = jax.lax.axis_index(axis)
    per_shard = sizes.reshape(ep, xl)                                     # what I send, per shard and expert
    send = jnp.sum(per_shard, axis=1)                                     # [ep]
    counts = jax.lax.all_gather(send, axis)                               # [from, to], tiny
    by_expert = jax.lax.all_to_all(per_shard, axis, 0, 0, tiled=True)     # [from, local expert] I receive
    recv = jnp.sum(by_expert, axis=1)                                     # [from]
    peers = jnp.arange(ep)
    lands_at = jnp.sum(jnp.where(peers[:, None] < me, counts, 0), axis=0)  # my rows' offset at each peer
    arrived_at = _exclusive_cumsum(recv)                                   # each peer's rows' offset here
    r = ep * a                                                             # worst case: every row comes here
    buf = ragged_exchange(xs, jnp.zeros((r, e), xs.dtype), _exclusive_cumsum(send), send, lands_at, recv, axis)
    # arrival order is (peer, local expert): regroup by local expert for the grouped matmuls
    row_expert = jnp.repeat(jnp.tile(jnp.arange(xl, dtype=jnp.int32), ep), by_expert.reshape(-1), total_repeat_length=r)
    row_expert = jnp.where(jnp.arange(r) < jnp.sum(recv), row_expert, xl)
    order = jnp.argsort(row_expert, stable=True)
    # the buffer is sized for the worst case; the grouped-matmul kernels visit only the tiles holding
    # rows, 1 in ep of them under balanced routing (`unijax.training.roofline` reads this scope)
    with jax.named_scope(f"{ACTIVE_ROWS_SCOPE}{ep}"):
        ys = grouped_ffn(weights, buf[order], jnp.sum(by_expert, axis=0).astype(jnp.int32), dtype)
    ys = ys[_inverse_permutation(order)]
    # back: the rows from peer p return to where p sent them from
    sent_from = jnp.sum(jnp.where(peers[None, :] < me, counts, 0), axis=1)  # peer p's offset of its rows for me
    return ragged_exchange(ys, jnp.zeros((a, e), ys.dtype), arrived_at, recv, sent_from, send, axis)


def _dropless_local(x: Array, ids: Array, gates: Array, weights, *, num_experts: int, dtype, ep: int = 1,
                    axis: str = "expert") -> Array:
    """The dropless dispatch of one device's tokens: x `[S, E]`, ids/gates `[S, K]` (invalid
    assignments carry id X) -> `[S, E]`. Assignments are sorted by expert locally (`argsort` over
    `S x K` rows), run through the grouped matmuls (on `ep` expert shards over `axis` when `ep > 1`),
    un-sorted and mixed with their gates."""
    s, kk = ids.shape
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)                                # invalid ones last
    sizes = jnp.sum(flat[:, None] == jnp.arange(num_experts)[None], axis=0).astype(jnp.int32)
    xs = x[order // kk]
    if ep > 1:
        ys = _to_experts_and_back(xs, sizes, weights, dtype, ep, axis)
    else:
        ys = grouped_ffn(weights, xs, sizes, dtype)
    out = ys[_inverse_permutation(order)].reshape(s, kk, -1)
    out = jnp.where((ids < num_experts)[..., None], out, jnp.zeros((), out.dtype))
    return jnp.einsum("ske,sk->se", out, gates.astype(out.dtype))


def _with_device_keys(weights, axes: tuple[str, ...]):
    """`Adapted` weights' dropout keys folded with this device's index on the batch `axes` (inside
    `shard_map`): without it every device would draw the same mask for its own tokens."""
    if not axes:
        return weights
    idx = jax.lax.axis_index(axes)

    def one(w):
        if not isinstance(w, lora.Adapted) or w.key is None:
            return w
        key = jax.vmap(lambda k: jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(k), idx)))(
            w.key.reshape(-1, 2)).reshape(w.key.shape)
        return dataclasses.replace(w, key=key)

    return tuple(one(w) for w in weights)


def dropless(x: Array, ids: Array, gates: Array, weights, *, num_experts: int, dtype) -> Array:
    """The dropless dispatch, local per device: without a context mesh the plain local computation;
    under one, `jax.shard_map` over the batch axes (each device sorts only its own tokens'
    assignments) with the experts sharded over `expert` (tokens travel to them by ragged all-to-all)
    when the mesh has one that divides the experts, else replicated (the expert axis then acts as
    data parallelism). The weights enter replicated over `fsdp` and `tensor` (the partitioner
    all-gathers them, a weight-sized collective; their gradients are reduce-scattered back).
    Tokens that do not split over the batch shards (a tiny decode batch) run replicated."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return _dropless_local(x, ids, gates, weights, num_experts=num_experts, dtype=dtype)
    axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
    if x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    ep = mesh.shape["expert"] if "expert" in axes and num_experts % mesh.shape["expert"] == 0 else 1
    P = jax.sharding.PartitionSpec
    tok = P(axes or None)
    wspec = jax.tree.map(lambda _: P("expert") if ep > 1 else P(), weights)

    def body(x, ids, gates, weights):
        return _dropless_local(x, ids, gates, _with_device_keys(weights, axes), num_experts=num_experts,
                               dtype=dtype, ep=ep)

    return jax.shard_map(body, in_specs=(tok, tok, tok, wspec), out_specs=tok, check_vma=False)(x, ids, gates, weights)


class TAMoE(nnx.Module):
    """The TA-MoE FFN (module docstring). `cfg` is the `JanusConfig`."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        m: MoEConfig = cfg.moe
        hidden = cfg.text.hidden_size
        inner = m.expert_intermediate_size or cfg.text.intermediate_size
        self.moe = m
        self.num_groups = 2
        self.num_experts = 2 * m.num_experts_per_group
        kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        # routers compute in float32 (z-loss and top-k ties are precision sensitive)
        self.task_router = linear(hidden, 2, ("embed", None), rngs=rngs, param_dtype=cfg.param_dtype)
        self.router = linear(hidden, self.num_experts, ("embed", None), rngs=rngs, param_dtype=cfg.param_dtype)
        std = cfg.text.initializer_range
        self.experts = Experts(self.num_experts, hidden, inner, std=std, **kw)
        self.shared = (SwiGLU(hidden, m.num_shared_experts * inner, bias=cfg.text.mlp_bias, std=std, **kw)
                       if m.num_shared_experts else None)
        self.alpha = nnx.Param(jnp.asarray(m.alpha_init, dtype_of(cfg.param_dtype)), out_sharding=())

    # -- routing ------------------------------------------------------------------------------
    def route(self, x: Array, task: Array | None):
        """x `[S, E]`, task `[S]` or None -> (expert ids `[S, K]`, gates `[S, K]`, task logits `[S, 2]`,
        router logits `[S, 2, N]`, group `[S]`): K = top_k, or 2 x top_k for `soft`."""
        m = self.moe
        n, k = m.num_experts_per_group, m.top_k
        xf = x.astype(jnp.float32)
        task_logits = xf @ self.task_router.kernel[...].astype(jnp.float32)
        logits = (xf @ self.router.kernel[...].astype(jnp.float32)).reshape(-1, 2, n)
        probs = jax.nn.softmax(logits, axis=-1)
        if m.group_assignment == "label":
            if task is None:
                raise ValueError("moe.group_assignment='label' needs the per-token task; pass `task` to the model "
                                 "(or set moe.group_assignment='router')")
            group = task.astype(jnp.int32)
        else:
            group = jnp.argmax(task_logits, axis=-1).astype(jnp.int32)
        if m.group_assignment == "soft":
            vals, idx = jax.lax.top_k(probs, k)                                   # [S, 2, k]
            gates = vals / jnp.sum(vals, -1, keepdims=True) * jax.nn.softmax(task_logits, -1)[..., None]
            ids = idx + (jnp.arange(2) * n)[None, :, None]
            return ids.reshape(-1, 2 * k), gates.reshape(-1, 2 * k), task_logits, logits, group
        p = jnp.take_along_axis(probs, group[:, None, None], axis=1)[:, 0]        # [S, N]
        vals, idx = jax.lax.top_k(p, k)
        gates = vals / jnp.sum(vals, -1, keepdims=True)
        return idx + group[:, None] * n, gates, task_logits, logits, group

    # -- dispatch -----------------------------------------------------------------------------
    def _dropless(self, x: Array, ids: Array, gates: Array) -> tuple[Array, Array]:
        h = dropless(x, ids, gates, self.experts.weights(), num_experts=self.num_experts, dtype=self.experts.dtype)
        return h, jnp.zeros((), jnp.float32)

    def _capacity(self, x: Array, ids: Array, gates: Array, exact: bool = False) -> tuple[Array, Array]:
        s, kk = ids.shape
        e = x.shape[-1]
        nx = self.num_experts
        groups, axes, ep = _mesh_batch_groups()
        if s % groups:
            groups, axes, ep = 1, (), False
        sg = s // groups
        cap = sg if exact else max(1, min(sg, math.ceil(self.moe.capacity_factor * sg * kk / nx)))
        xg = _constrain(x.reshape(groups, sg, e), (axes or None, None, None))
        # assignments in priority order: every token's first choice, then its second, ...
        a_ids = ids.reshape(groups, sg, kk).transpose(0, 2, 1).reshape(groups, kk * sg)
        onehot = (a_ids[..., None] == jnp.arange(nx)).astype(jnp.int32)           # [G, A, X]
        pos = jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1)        # [G, A]
        valid = a_ids < nx
        keep = valid & (pos < cap)
        slot = jnp.where(keep, a_ids * cap + pos, nx * cap)                       # nx*cap: the trash slot
        token = jnp.tile(jnp.arange(sg), kk)[None].repeat(groups, 0)
        # scatter / gathers vmapped over the dispatch groups: each stays local to its group's shard (a
        # batched-index scatter is replicated by the partitioner, which all-gathers every token everywhere)
        src = jax.vmap(lambda sl, tk: jnp.full((nx * cap + 1,), sg, jnp.int32).at[sl].set(tk)[: nx * cap])(slot, token)
        xpad = jnp.concatenate([xg, jnp.zeros((groups, 1, e), xg.dtype)], axis=1)
        buf = jax.vmap(lambda xp, sr: xp[sr])(xpad, src).reshape(groups, nx, cap, e)
        spec = (tuple(a for a in axes if a != "expert") or None, "expert" if ep else None, None, None)
        buf = _constrain(buf, spec)                                               # all-to-all to experts
        out = _constrain(self.experts.batched(buf), spec)
        out = _constrain(out.reshape(groups, nx * cap, e), (axes or None, None, None))  # and back
        out = jnp.concatenate([out, jnp.zeros((groups, 1, e), out.dtype)], axis=1)
        ya = jax.vmap(lambda o, sl: o[sl])(out, slot)                            # [G, A, E]
        ya = ya.reshape(groups, kk, sg, e).transpose(0, 2, 1, 3).reshape(s, kk, e)
        y = jnp.einsum("ske,sk->se", ya, gates.astype(ya.dtype))
        return y, jnp.sum(valid & ~keep).astype(jnp.float32)

    # -- forward ------------------------------------------------------------------------------
    def __call__(self, x: Array, task: Array | None = None, valid: Array | None = None, exact: bool = False):
        """x `[B, T, E]`, task/valid `[B, T]` (valid: not padding) -> (y `[B, T, E]`, aux dict).

        `exact` (decoding with a KV cache) gives `capacity` room for every assignment: no drops at inference."""
        b, t, e = x.shape
        m = self.moe
        n, nx = m.num_experts_per_group, self.num_experts
        xf = x.reshape(b * t, e)
        valid_f = jnp.ones((b * t,), bool) if valid is None else valid.reshape(-1)
        ids, gates, task_logits, logits, group = self.route(xf, None if task is None else task.reshape(-1))
        ids = jnp.where(valid_f[:, None], ids, nx)  # padding takes no expert capacity
        impl = resolved_impl(m)
        if impl == "dropless":
            h, dropped = self._dropless(xf, ids, gates)
        else:
            h, dropped = self._capacity(xf, ids, gates, exact)
        y = h.astype(x.dtype)
        if self.shared is not None:
            y = y + self.alpha[...].astype(x.dtype) * self.shared(x).reshape(b * t, e)

        # auxiliaries, over valid tokens
        w = valid_f.astype(jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)                                    # [S, 2, N]
        chosen = jnp.sum(jax.nn.one_hot(ids, nx + 1, dtype=jnp.float32)[..., :nx], axis=1)  # [S, X]
        load = jnp.sum(chosen * w[:, None], axis=0)                                # assignments per expert
        in_group = jax.nn.one_hot(group, 2, dtype=jnp.float32) * w[:, None]       # [S, 2]
        n_g = jnp.sum(in_group, axis=0)                                            # tokens per group
        f = jnp.einsum("sg,sgn->gn", in_group, chosen.reshape(-1, 2, n)) / jnp.maximum(n_g * m.top_k, 1)[:, None]
        p = jnp.einsum("sg,sgn->gn", in_group, probs) / jnp.maximum(n_g, 1)[:, None]
        present = (n_g > 0).astype(jnp.float32)
        balance = jnp.sum(present * n * jnp.sum(f * p, axis=-1)) / jnp.maximum(jnp.sum(present), 1)
        lse = jax.nn.logsumexp(logits, axis=-1)                                    # [S, 2]
        z = jnp.sum(jnp.sum(in_group * lse**2, axis=-1)) / jnp.maximum(jnp.sum(w), 1)
        aux = {"task_logits": task_logits.reshape(b, t, 2), "balance": balance, "z": z, "load": load,
               "dropped": dropped, "alpha": self.alpha[...].astype(jnp.float32)}
        if exact:  # decoding: each row's assignments per expert (a served answer's routing, `unijax.serving`)
            aux["row_load"] = jnp.sum(chosen.reshape(b, t, nx) * w.reshape(b, t, 1), axis=1)
        if task is not None:  # assignments per expert from the tokens of each task (expert-load plots)
            by_task = jax.nn.one_hot(task.reshape(-1), 2, dtype=jnp.float32) * w[:, None]  # [S, 2]
            aux["load_by_task"] = jnp.einsum("st,sx->tx", by_task, chosen)
        return y.reshape(b, t, e), aux
