"""Sparse upcycling (unijax/training/upcycle.py): dense Janus models -> a TA-MoE Janus.

Reference: the dense stage-1 models themselves. With no noise, zero routers and alpha = 0, the
upcycled model's logits on MMU tokens equal the `und` model's and on T2I tokens the `gen` model's;
the shared expert equals the base FFN. Tolerance float32: 1e-5 absolute / relative on logits."""

import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unijax import checkpoints
from unijax.contract import GEN_IMAGE, MMU, T2I, TEXT
from unijax.models.config import MoEConfig
from unijax.models.family import preset
from unijax.models.janus import Janus
from unijax.training.upcycle import upcycle, upcycle_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-5
MOE = MoEConfig(num_experts_per_group=3, top_k=2, num_shared_experts=1, alpha_init=0.0, group_assignment="label",
                impl="dropless")


def tiny(**kw):
    return preset("tiny", text={"num_layers": 2}, **kw)


@functools.cache
def skeleton(cfg):
    """(graphdef, abstract state) of Janus(cfg); tracing the constructor takes seconds."""
    return nnx.split(nnx.eval_shape(lambda: Janus(cfg, rngs=nnx.Rngs(0))))


def with_params(cfg, params: dict) -> Janus:
    """Janus(cfg) holding the pure-dict `params`."""
    m = nnx.merge(*skeleton(cfg), copy=True)
    state = nnx.state(m, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(m, state)
    return m


def stage1(base: Janus, donor: Janus, layers=(0, 1)) -> Janus:
    """base with the decoder FFNs of `layers` taken from donor: a stage-1 per-task model (attention frozen)."""
    p = nnx.to_pure_dict(nnx.state(base, nnx.Param))
    d = nnx.to_pure_dict(nnx.state(donor, nnx.Param))
    for i in layers:
        p["language_model"]["layers"][i]["mlp"] = d["language_model"]["layers"][i]["mlp"]
    return with_params(base.cfg, p)


def scanned(model: Janus) -> Janus:
    """The same parameters in the scanned-layers layout."""
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    layers = p["language_model"]["layers"]
    p["language_model"]["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[i] for i in sorted(layers)])
    return with_params(model.cfg.replace(scan_layers=True), p)


def random_model(cfg, seed: int) -> Janus:
    """Janus(cfg) with random parameters drawn by numpy: no per-op compiles, unlike the eager init."""
    g = np.random.default_rng(seed)

    def draw(path, x):
        norm = jax.tree_util.keystr(path).endswith(("['weight']", "['scale']"))
        return jnp.asarray((1.0 if norm else 0.0) + (0.1 if norm else 0.02) * g.standard_normal(x.shape), x.dtype)

    abstract = nnx.to_pure_dict(skeleton(cfg)[1])
    return with_params(cfg, jax.tree_util.tree_map_with_path(draw, abstract))


@pytest.fixture(scope="module")
def models():
    """(base, und, gen): und and gen are base with other decoder FFNs, as after stage 1."""
    base = random_model(tiny(), 0)
    return base, stage1(base, random_model(tiny(), 1)), stage1(base, random_model(tiny(), 2))


def mixed_batch(cfg, seed=0):
    """Row 0: one T2I sequence (prompt, then image codes). Row 1 packs an MMU text sequence and a T2I
    sequence. -> tokens, modality, positions, segment_ids, task, all `[2, 16]`."""
    g = np.random.default_rng(seed)
    t = 16
    tok = g.integers(6, cfg.text.vocab_size, (2, t))
    mod = np.full((2, t), TEXT)
    mod[0, 6:] = GEN_IMAGE
    mod[1, 12:] = GEN_IMAGE
    tok = np.where(mod == GEN_IMAGE, g.integers(0, cfg.vq.num_embeddings, (2, t)), tok)
    pos = np.stack([np.arange(t), np.r_[np.arange(7), np.arange(9)]])
    seg = np.stack([np.ones(t), np.r_[np.ones(7), 2 * np.ones(9)]]).astype(np.int32)
    task = np.stack([np.full(t, T2I), np.r_[np.full(7, MMU), np.full(9, T2I)]])
    return tuple(jnp.asarray(a) for a in (tok, mod, pos, seg, task))


@nnx.jit
def logits(model, tok, mod, pos, seg, task):
    h, _ = model(tok, mod, pos, seg, task=task)
    return model.text_logits(h), model.image_logits(h)


@pytest.mark.parametrize("impl,scan,layers", [("dropless", False, (1,)), ("capacity", True, ())])
def test_upcycled_logits_equal_und_on_mmu_and_gen_on_t2i(models, impl, scan, layers):
    base, und, gen = models
    # zero routers send a group's every token to the same top-k experts: capacity 2N/k keeps them all
    moe = dataclasses.replace(MOE, impl=impl, layers=layers, capacity_factor=2 * MOE.num_experts_per_group / MOE.top_k)
    moe_model = upcycle(scanned(base) if scan else base, und, gen, moe, noise=0.0, router_std=0.0)
    assert moe_model.cfg.ffn == "ta_moe" and moe_model.cfg.scan_layers == scan
    batch = mixed_batch(base.cfg)
    task = np.asarray(batch[-1])[..., None]
    got = logits(moe_model, *batch)
    # layers left dense by moe.layers keep base's FFN
    ref_und, ref_gen = (stage1(base, m, layers or (0, 1)) for m in (und, gen))
    want_und, want_gen = logits(ref_und, *batch), logits(ref_gen, *batch)
    for g, u, v in zip(got, want_und, want_gen):
        want = np.where(task == MMU, u, v)
        np.testing.assert_allclose(g, want, rtol=TOL, atol=TOL)
        assert np.max(np.abs(np.asarray(u) - np.asarray(v))) > 1e-3  # und and gen really differ


@pytest.mark.parametrize("shared", [1, 2])
def test_shared_expert_equals_base_ffn(models, shared):
    base, und, gen = models
    moe = dataclasses.replace(MOE, num_shared_experts=shared, alpha_init=1.0)
    moe_model = upcycle(base, und, gen, moe)
    x = jax.random.normal(jax.random.key(0), (2, 5, base.cfg.text.hidden_size))
    task = jnp.asarray([[MMU] * 5, [T2I] * 5])

    @nnx.jit
    def ffns(mlp, base_mlp, und_mlp, gen_mlp):
        return mlp.shared(x), mlp(x, task)[0], base_mlp(x), und_mlp(x), gen_mlp(x)

    for i in range(base.cfg.text.num_layers):
        mlp = moe_model.language_model.layers[i].mlp
        assert mlp.shared.gate_proj.kernel.shape[-1] == shared * base.cfg.text.intermediate_size
        got_shared, got, dense, und_ffn, gen_ffn = ffns(mlp, *(m.language_model.layers[i].mlp for m in models))
        np.testing.assert_allclose(got_shared, dense, rtol=TOL, atol=TOL)
        # alpha = 1: the layer is its group's expert FFN plus the base FFN
        np.testing.assert_allclose(got, jnp.where((task == MMU)[..., None], und_ffn, gen_ffn) + dense, rtol=TOL,
                                   atol=TOL)


def test_noise_makes_expert_copies_differ(models):
    base, und, gen = models
    noise, n = 0.05, MOE.num_experts_per_group
    m = upcycle(base, und, gen, MOE, noise=noise, router_std=1e-2, seed=3)
    rels = []
    for i in range(base.cfg.text.num_layers):
        mlp = m.language_model.layers[i].mlp
        gate = np.asarray(mlp.experts.gate_proj[...])
        for g, src in ((0, und), (1, gen)):
            dense = np.asarray(src.language_model.layers[i].mlp.gate_proj.kernel[...])
            rel = gate[g * n:(g + 1) * n] / dense - 1  # the multiplicative noise of each copy
            assert abs(rel.std() / noise - 1) < 0.05 and abs(rel.mean()) < 1e-3
            for a in range(n):
                for b in range(a):
                    assert np.max(np.abs(rel[a] - rel[b])) > noise  # independent per copy
            rels.append(rel)
        assert abs(np.asarray(mlp.router.kernel[...]).std() / 1e-2 - 1) < 0.1
        shared = np.asarray(mlp.shared.gate_proj.kernel[...]) / base.language_model.layers[i].mlp.gate_proj.kernel[...]
        assert abs((shared - 1).std() / noise - 1) < 0.05  # the shared copy is noisy too
    assert np.max(np.abs(rels[0] - rels[2])) > noise  # and per layer


def test_mismatched_architecture_raises(models, tmp_path):
    base, und, _ = models
    cfg = base.cfg.replace(text=dataclasses.replace(base.cfg.text, intermediate_size=256))
    other = nnx.merge(*skeleton(cfg), copy=True)
    with pytest.raises(ValueError, match=r"gen has a different architecture .*text.intermediate_size: 344 != 256"):
        upcycle(base, und, other, MOE)
    with pytest.raises(ValueError, match="moe.expert_intermediate_size=256"):
        upcycle(base, und, None, dataclasses.replace(MOE, expert_intermediate_size=256))
    # the CLI path names the checkpoint, before loading any parameters (only model.json is read)
    for name, cfg in (("base", base.cfg), ("und", other.cfg)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.json").write_text(json.dumps(cfg.to_dict()))
    with pytest.raises(ValueError, match=f"{tmp_path / 'und'} has a different architecture"):
        upcycle_checkpoint(tmp_path / "base", tmp_path / "out", und_dir=tmp_path / "und", moe=MOE)
    assert not (tmp_path / "out").exists()


def test_cli_writes_a_loadable_ta_moe_checkpoint(models, tmp_path):
    base, _, gen = models
    for name, m in (("base", base), ("gen", gen)):
        checkpoints.save_model(tmp_path / name, m)
    out = tmp_path / "upcycled"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "unijax.upcycle", "--base", str(tmp_path / "base"),
                        "--gen", str(tmp_path / "gen"), "--out", str(out), "--noise", "0.01", "--alpha_init", "0",
                        "--num_experts_per_group", "3", "--top_k", "2", "--impl", "dropless", "--seed", "5"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "upcycled 2/2 decoder layers" in r.stdout
    assert "note:" not in r.stdout  # gen's non-FFN parameters are base's: no warning
    loaded = checkpoints.load_model(out)
    assert loaded.cfg.ffn == "ta_moe" and loaded.cfg.moe == MOE
    want = checkpoints.flat_params(upcycle(base, None, gen, MOE, noise=0.01, seed=5))
    got = checkpoints.flat_params(loaded)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    with pytest.raises(FileExistsError, match="--overwrite"):
        upcycle_checkpoint(tmp_path / "base", out, moe=MOE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "gen", "upcycled"]  # no partial dir
