r"""Sparse upcycling: dense Janus checkpoints -> a TA-MoE Janus (stage 1 -> stage 2 of UniDecouple).

    python -m unijax.upcycle --base workdir/base/model --out workdir/upcycled \
        [--und DIR] [--gen DIR] [--noise 0.01] [--alpha_init 0] [--num_experts_per_group 4] \
        [--top_k 2] [--num_shared_experts 1] [--group_assignment label] [--overwrite]
    python -m unijax.train --config configs/ta_moe.py --config.init_from=workdir/upcycled

Stage 1 trains one dense FFN per task with the attention frozen: `und` (understanding, MMU) and
`gen` (generation, T2I) are dense checkpoints of the same architecture as `base`, differing from it
in their decoder FFNs. Each TA-MoE layer (`unijax.models.moe.TAMoE`) of the output is built as

    experts[0 : N]    (MMU group)  <- N copies of und's SwiGLU of that layer
    experts[N : 2N]   (T2I group)  <- N copies of gen's SwiGLU of that layer
    shared            (inner S*M)  <- S copies of base's SwiGLU side by side, down_proj / S each,
                                      so that shared(x) == base_ffn(x) (up to rounding for S > 1)
    task_router, router            <- N(0, router_std^2) kernels (exactly 0 when router_std = 0)
    alpha                          <- moe.alpha_init

Every copy (group and shared) is multiplied element-wise by `1 + noise * eps`, eps ~ N(0, 1) drawn
independently per copy, so that identical experts can diverge under training (T5X sparse upcycling
copies without noise; with `noise = 0` copies stay identical until the router breaks the tie).
Everything outside the FFNs (attention, norms, embeddings, vision, VQ, heads) and the dense FFNs of
layers that `moe.layers` leaves dense come from `base`. `und` / `gen` default to `base`.

Why this preserves the function: inside a group the top-k gates are renormalised to sum to 1 over
identical copies, so the group output is that group's dense FFN; with `alpha = 0` the shared expert
adds nothing. So with `noise = 0`, `alpha_init = 0` and `group_assignment = label`, the MoE model's
outputs on MMU tokens equal `und`'s and on T2I tokens equal `gen`'s, provided their non-FFN
parameters equal `base`'s (stage 1 freezes them; the CLI prints the difference when they do not)
and the dispatch drops nothing (`impl = dropless`, or `capacity` with enough capacity; note that
zero routers send every token of a group to the same top-k experts). With `alpha = 1` (the config
default) the layer starts at `group_ffn(x) + base_ffn(x)`.

`train.init_from` checks that the checkpoint's architecture, `moe.*` included, equals the training
config's: pass the same `moe.*` values here as in the config.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unijax import checkpoints
from unijax.data.tokenizer import carried_tokenizer
from unijax.models import family
from unijax.models.config import RUNTIME_KEYS, JanusConfig, MoEConfig
from unijax.models.janus import Janus

Array = jax.Array


FFN_KEYS = ("gate_proj", "up_proj", "down_proj")


# -- checks -------------------------------------------------------------------------------------
def architecture_differences(a: JanusConfig, b: JanusConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """`key: a_value != b_value` for every architecture field (runtime fields and `ignore` left out)
    that differs."""
    out = []
    for f in dataclasses.fields(a):
        if f.name in RUNTIME_KEYS or f.name in ignore:
            continue
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(va):
            out += [f"{f.name}.{g.name}: {getattr(va, g.name)!r} != {getattr(vb, g.name)!r}"
                    for g in dataclasses.fields(va) if getattr(va, g.name) != getattr(vb, g.name)]
        elif va != vb:
            out.append(f"{f.name}: {va!r} != {vb!r}")
    return out


def check_compatible(base_cfg: JanusConfig, other_cfg: JanusConfig, name: str, base_name: str = "base") -> None:
    """Raises ValueError unless `other_cfg` (the checkpoint/model `name`) is a dense model with
    `base_cfg`'s architecture."""
    if other_cfg.ffn != "dense":
        raise ValueError(f"{name} has model.ffn={other_cfg.ffn!r}: upcycling reads dense FFNs; "
                         f"pass a dense checkpoint")
    diff = architecture_differences(base_cfg, other_cfg, ignore=("moe",))  # moe.* is unused by dense models
    if diff:
        raise ValueError(f"{name} has a different architecture than {base_name} ({'; '.join(diff)}): "
                         f"its FFNs cannot become experts of {base_name}'s layers")


def _check_moe(cfg: JanusConfig, moe: MoEConfig) -> JanusConfig:
    t = cfg.text
    inner = moe.expert_intermediate_size or t.intermediate_size
    if inner != t.intermediate_size:
        raise ValueError(f"moe.expert_intermediate_size={moe.expert_intermediate_size} != the dense FFN's "
                         f"text.intermediate_size={t.intermediate_size}: upcycled experts are copies of the dense "
                         f"FFN; set moe.expert_intermediate_size=0 (or {t.intermediate_size})")
    if t.mlp_bias:
        raise ValueError("text.mlp_bias=True: TA-MoE experts have no biases, so a dense FFN with biases cannot "
                         "be copied into them exactly")
    return cfg.replace(ffn="ta_moe", moe=moe).validate()


# -- per-layer FFN weights ----------------------------------------------------------------------
def dense_ffn(model: Janus, index: int) -> tuple[Array, Array, Array]:
    """(gate `[embed, mlp]`, up `[embed, mlp]`, down `[mlp, embed]`) kernels of a dense model's decoder
    layer `index`, for scanned (`[layers, ...]`) and unscanned layouts alike."""
    layers = model.language_model.layers
    mlp = layers.mlp if model.cfg.scan_layers else layers[index].mlp
    ws = tuple(getattr(mlp, k).kernel[...] for k in FFN_KEYS)
    return tuple(w[index] for w in ws) if model.cfg.scan_layers else ws


@functools.partial(jax.jit, static_argnames=("n", "s", "dtype"))
def _moe_layer(und, gen, base, alpha, noise, router_std, key, *, n: int, s: int, dtype) -> dict:
    hidden, inner = base[0].shape
    k_noise, k_router = jax.random.split(key)
    # one draw for every copy of every tensor (one RNG in the program compiles much faster than nine)
    eps = jax.random.normal(k_noise, (len(FFN_KEYS), 2 * n + s, hidden * inner), jnp.float32)
    experts, shared = {}, {}
    for j, name in enumerate(FFN_KEYS):
        w = jnp.concatenate([jnp.broadcast_to(src[j].astype(jnp.float32), (c, *src[j].shape))
                             for src, c in ((und, n), (gen, n), (base, s))])      # [2N + S, ...]
        w = w * (1.0 + noise * eps[j].reshape(w.shape))                         # exact copies for noise = 0
        experts[name] = w[: 2 * n]
        if s and name == "down_proj":  # S copies [M, E] / S stacked along mlp: [S*M, E]
            shared[name] = {"kernel": (w[2 * n:] / s).reshape(s * inner, hidden)}
        elif s:                        # S copies [E, M] side by side: [E, S*M]
            shared[name] = {"kernel": w[2 * n:].transpose(1, 0, 2).reshape(hidden, s * inner)}
    routers = router_std * jax.random.normal(k_router, (hidden, 2 + 2 * n), jnp.float32)
    out = {"experts": experts, "task_router": {"kernel": routers[:, :2]}, "router": {"kernel": routers[:, 2:]},
           "alpha": alpha}
    if s:
        out["shared"] = shared
    return jax.tree.map(lambda x: x.astype(dtype), out)


def moe_layer_params(und: tuple[Array, ...], gen: tuple[Array, ...], base: tuple[Array, ...], moe: MoEConfig, *,
                     noise: float, router_std: float, key: Array, dtype) -> dict:
    """Pure-dict parameters of one `TAMoE` layer (module docstring) from three dense SwiGLUs'
    (gate `[E, M]`, up `[E, M]`, down `[M, E]`) kernels."""
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return _moe_layer(und, gen, base, f32(moe.alpha_init), f32(noise), f32(router_std), key,
                      n=moe.num_experts_per_group, s=moe.num_shared_experts, dtype=jnp.dtype(dtype))


# -- the model ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _abstract(cfg: JanusConfig):
    """(graphdef, abstract state) of Janus(cfg): tracing the constructor costs seconds, so it is cached."""
    return nnx.split(nnx.eval_shape(lambda: family.build(cfg, nnx.Rngs(0))))


def upcycle(base: Janus, und: Janus | None, gen: Janus | None, moe: MoEConfig, *, noise: float = 0.0,
            router_std: float = 1e-3, seed: int = 0) -> Janus:
    """A TA-MoE Janus (`base.cfg` with `ffn="ta_moe"`, `moe`) upcycled from dense models (module
    docstring). `und` / `gen` (None: `base`) give the MMU / T2I experts; `noise` is the relative scale
    of the multiplicative Gaussian noise on every expert copy; `router_std` the std of both routers'
    kernels (0: uniform routing); `seed` draws noise and routers."""
    if base.cfg.ffn != "dense":
        raise ValueError(f"base has model.ffn={base.cfg.ffn!r}: upcycling reads dense FFNs; pass a dense model")
    und = base if und is None else und
    gen = base if gen is None else gen
    check_compatible(base.cfg, und.cfg, "und")
    check_compatible(base.cfg, gen.cfg, "gen")
    if noise < 0 or router_std < 0:
        raise ValueError(f"noise={noise} and router_std={router_std} must be >= 0")
    cfg = _check_moe(base.cfg, moe)
    dtype = jnp.dtype(cfg.param_dtype)
    key = jax.random.key(seed)
    num_layers = cfg.text.num_layers

    def layer(i: int) -> dict:
        return moe_layer_params(dense_ffn(und, i), dense_ffn(gen, i), dense_ffn(base, i), moe, noise=noise,
                                router_std=router_std, key=jax.random.fold_in(key, i), dtype=dtype)

    params = nnx.to_pure_dict(nnx.state(base, nnx.Param))
    layers = params["language_model"]["layers"]
    if cfg.scan_layers:  # validate() guarantees every layer is TA-MoE
        layers["mlp"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[layer(i) for i in range(num_layers)])
    else:
        for i in range(num_layers):
            if moe.is_moe_layer(i):
                layers[i]["mlp"] = layer(i)

    model = nnx.merge(*_abstract(cfg), copy=True)
    state = nnx.state(model, nnx.Param)
    want = nnx.to_pure_dict(state)
    if jax.tree.structure(want) != jax.tree.structure(params):
        raise AssertionError(f"upcycled parameter tree does not match Janus({cfg})")
    for (path, w), p in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(params)):
        if w.shape != p.shape:
            raise AssertionError(f"{jax.tree_util.keystr(path)}: upcycled shape {p.shape} != model shape {w.shape}")
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda p: jnp.asarray(p, dtype=dtype), params))
    nnx.update(model, state)
    return model


def outside_ffn_max_diff(a: Janus, b: Janus) -> float:
    """Largest |a - b| over the parameters outside the decoder FFNs (0 for a stage-1 pair, whose
    attention, embeddings and heads were frozen). Layouts (scan) may differ."""
    def flat(m):  # {dotted path: array}, scanned layers split into per-layer entries
        out = {}
        for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param)):
            v = v.get_value() if hasattr(v, "get_value") else v
            if k[:2] != ("language_model", "layers"):
                out[".".join(map(str, k))] = v
            elif "mlp" in k:
                continue
            elif m.cfg.scan_layers:
                out.update({".".join(map(str, (*k[:2], i, *k[2:]))): v[i] for i in range(v.shape[0])})
            else:
                out[".".join(map(str, k))] = v
        return out

    return float(_max_abs_diff(flat(a), flat(b)))


@jax.jit
def _max_abs_diff(a: dict, b: dict) -> Array:
    return jnp.max(jnp.stack([jnp.max(jnp.abs(a[k].astype(jnp.float32) - b[k].astype(jnp.float32))) for k in a]))


def count_params(model: Janus) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# -- checkpoints and CLI ------------------------------------------------------------------------
def upcycle_checkpoint(base_dir, out, und_dir=None, gen_dir=None, moe: MoEConfig = MoEConfig(), *,
                       noise: float = 0.0, router_std: float = 1e-3, seed: int = 0, overwrite: bool = False,
                       log=print) -> Janus:
    """Reads dense model checkpoints, upcycles them (`upcycle`) and writes the model checkpoint `out`
    (atomically: a failure leaves no `out`). Returns the upcycled model."""
    out = pathlib.Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    sources = {"base": base_dir, "und": und_dir, "gen": gen_dir}
    for name, d in sources.items():
        if d is not None and pathlib.Path(d).absolute() == out.absolute():
            raise ValueError(f"--out {out} is also --{name}; write the upcycled model elsewhere")
    base_cfg = checkpoints.read_config(base_dir)
    if base_cfg.ffn != "dense":
        raise ValueError(f"{base_dir} has model.ffn={base_cfg.ffn!r}: --base must be a dense checkpoint")
    for name in ("und", "gen"):  # before loading anything
        if sources[name] is not None:
            check_compatible(base_cfg, checkpoints.read_config(sources[name]), str(sources[name]), str(base_dir))
    _check_moe(base_cfg, moe)
    base = checkpoints.load_model(base_dir)
    models = {pathlib.Path(base_dir).resolve(): base}  # each directory loaded once
    for name in ("und", "gen"):
        d = sources[name]
        if d is None or pathlib.Path(d).resolve() in models:
            continue
        models[pathlib.Path(d).resolve()] = checkpoints.load_model(d)
        diff = outside_ffn_max_diff(base, models[pathlib.Path(d).resolve()])
        if diff:
            log(f"note: {d} differs from {base_dir} outside the FFNs (max |diff| {diff:.3g}); the upcycled model "
                f"takes those parameters from --base, so its {name} outputs will not equal {d}'s")
    und, gen = (None if d is None else models[pathlib.Path(d).resolve()] for d in (und_dir, gen_dir))
    model = upcycle(base, und, gen, moe, noise=noise, router_std=router_std, seed=seed)
    carried = carried_tokenizer(pathlib.Path(base_dir) / checkpoints.TOKENIZER_DIR)  # the base's tokenizer
    checkpoints.save_model(out, model, carried, overwrite=overwrite)
    layers = [i for i in range(model.cfg.text.num_layers) if moe.is_moe_layer(i)]
    log(f"wrote {out}: {count_params(model):,} params (dense base {count_params(base):,}); upcycled "
        f"{len(layers)}/{model.cfg.text.num_layers} decoder layers {layers} to TA-MoE with 2x"
        f"{moe.num_experts_per_group} experts (top-{moe.top_k}), {moe.num_shared_experts} shared, "
        f"alpha {moe.alpha_init}, noise {noise}, router_std {router_std}")
    return model
