"""DPO (`train.objective=dpo`): the loss and its gradients against a float64 implementation written
from the papers (TRL's `dpo_loss` formulas), the fused model path against the whole-logits one, the
adapters-off reference of a TA-MoE + LoRA run, gradient accumulation, and the preference formats.

Tolerances: 1e-5 relative (float32 against float64) for losses and gradients; exact where the
computation is the same."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import base
from unijax import contract, sharding
from unijax.data import pipeline, preference, records
from unijax.data.tokenizer import shapes_tokenizer
from unijax.models import family, forward
from unijax.training import objectives, steps
from unijax.training import setup as train_setup
from unijax.training.config import model_config
from unijax.training.objectives import dpo

TOL = dict(rtol=1e-5, atol=1e-6)


# -- float64 reference ---------------------------------------------------------------------------------

def log_sigmoid64(x):
    return -np.logaddexp(0.0, -x)


def reference_loss64(pc, pr, rc, rr, nc, nr, beta, loss_type, ls):
    """Per-pair loss and d loss / d (pc, pr) in float64 (Rafailov et al. eq. 7 with cDPO smoothing;
    Azar et al. eq. 17 on per-token means, as TRL computes IPO)."""
    pc, pr, rc, rr, nc, nr = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr, nc, nr))
    if loss_type == "ipo":
        z = (pc - rc) / nc - (pr - rr) / nr
        loss = (z - 1 / (2 * beta)) ** 2
        dz = 2 * (z - 1 / (2 * beta))
        return loss, dz / nc, -dz / nr
    z = (pc - rc) - (pr - rr)
    loss = -log_sigmoid64(beta * z) * (1 - ls) - log_sigmoid64(-beta * z) * ls
    sig = 1 / (1 + np.exp(-beta * z))
    dz = -beta * (1 - ls) * (1 - sig) + beta * ls * sig
    return loss, dz, -dz


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_preference_loss_and_gradients_match_float64(loss_type, ls):
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-40, 8, 16).astype(np.float32) for _ in range(4))
    nc, nr = (rng.integers(5, 40, 16).astype(np.float32) for _ in range(2))
    beta = 0.1

    def total(pc, pr):
        loss, _, _ = dpo.preference_loss(pc, pr, rc, rr, nc, nr, beta=beta, loss_type=loss_type, label_smoothing=ls)
        return jnp.sum(loss), loss

    (_, loss), (gc, gr) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(pc, pr)
    ref, ref_gc, ref_gr = reference_loss64(pc, pr, rc, rr, nc, nr, beta, loss_type, ls)
    np.testing.assert_allclose(loss, ref, **TOL)
    np.testing.assert_allclose(gc, ref_gc, **TOL)
    np.testing.assert_allclose(gr, ref_gr, **TOL)
    _, cr, rj = dpo.preference_loss(pc, pr, rc, rr, nc, nr, beta=beta, loss_type=loss_type, label_smoothing=ls)
    scale = (nc, nr) if loss_type == "ipo" else (1.0, 1.0)
    np.testing.assert_allclose(cr, beta * (pc.astype(np.float64) - rc) / scale[0], **TOL)
    np.testing.assert_allclose(rj, beta * (pr.astype(np.float64) - rr) / scale[1], **TOL)


def test_loss_on_logits_matches_float64_with_sft_term():
    """Summed response log-probs from both heads' logits, the sigmoid loss and the chosen-side SFT
    term, and their gradients with respect to the logits."""
    rng = np.random.default_rng(1)
    n, t, v, k = 6, 7, 11, 5  # 3 pairs, rows 2i / 2i + 1
    text, image = rng.normal(0, 2, (n, t, v)).astype(np.float32), rng.normal(0, 2, (n, t, k)).astype(np.float32)
    ref_text, ref_image = rng.normal(0, 2, (n, t, v)), rng.normal(0, 2, (n, t, k))
    targets = rng.integers(0, k, (n, t))
    tw = (rng.random((n, t)) < 0.4).astype(np.float32)
    iw = ((rng.random((n, t)) < 0.4) & (tw == 0)).astype(np.float32)
    tw[:, 0] = 1.0  # every row has a response token
    rows = {"text_weights": tw, "image_weights": iw}
    beta, sft = 0.5, 0.3

    def logsm64(x):
        x = np.asarray(x, np.float64)
        return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)

    def logps64(tl, il):
        lt = np.take_along_axis(logsm64(tl), targets[..., None], -1)[..., 0]
        li = np.take_along_axis(logsm64(il), targets[..., None], -1)[..., 0]
        return np.sum(lt * tw + li * iw, 1)

    def ours(tl, il):
        ce_t = -jnp.take_along_axis(jax.nn.log_softmax(tl), targets[..., None], -1)[..., 0]
        ce_i = -jnp.take_along_axis(jax.nn.log_softmax(il), targets[..., None], -1)[..., 0]
        logp, cnt = dpo.response_logps(ce_t, ce_i, rows)
        ref = jnp.asarray(logps64(ref_text, ref_image), jnp.float32)
        loss, _, _ = dpo.preference_loss(logp[0::2], logp[1::2], ref[0::2], ref[1::2], cnt[0::2], cnt[1::2],
                                         beta=beta)
        return jnp.mean(loss) + sft * jnp.sum(-logp[0::2]) / jnp.sum(cnt[0::2])

    value, (g_text, g_image) = jax.value_and_grad(ours, argnums=(0, 1))(text, image)
    logp, ref = logps64(text, image), logps64(ref_text, ref_image)
    cnt = (tw + iw).sum(1)
    loss, dpc, dpr = reference_loss64(logp[0::2], logp[1::2], ref[0::2], ref[1::2], None, None, beta, "sigmoid", 0.0)
    value64 = loss.mean() + sft * np.sum(-logp[0::2]) / cnt[0::2].sum()
    np.testing.assert_allclose(value, value64, **TOL)
    dlogp = np.zeros(n)
    dlogp[0::2], dlogp[1::2] = dpc / 3 - sft / cnt[0::2].sum(), dpr / 3
    onehot = lambda m: np.eye(m)[targets]  # noqa: E731
    sm = lambda x: np.exp(logsm64(x))  # noqa: E731
    np.testing.assert_allclose(g_text, dlogp[:, None, None] * tw[..., None] * (onehot(v) - sm(text)), **TOL)
    np.testing.assert_allclose(g_image, dlogp[:, None, None] * iw[..., None] * (onehot(k) - sm(image)), **TOL)


def assert_grads_close(a, b):
    """Every gradient leaf within 1e-5 of the leaf's largest entry (float32 sums in another order)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * max(float(np.abs(y).max()), 1e-3))


# -- the model path --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return shapes_tokenizer(tmp_path_factory.mktemp("data"))


def dpo_config(**train):
    c = base.get_config()
    c.train.objective = "dpo"
    c.model.text.num_layers = 2  # the tiny model, two layers: compiles faster
    c.data.update(max_len=112, turns_per_image=1)
    c.train.update(batch_size=4, **train)
    return c


def pair_batch(c, tok, cfg, batch_size=4, seed=0):
    layout = pipeline.Layout.for_data(cfg, c.data)
    obj = objectives.get(c)
    dsets, weights = obj.datasets(c, layout.image_size, seed)
    it = iter(pipeline.batches(dsets, weights, tokenizer=tok, layout=layout, batch_size=batch_size, seed=seed,
                               encoder=obj.encoder(tok, layout)))
    return next(it), layout


def test_pairs_batch_shapes_and_sides(tok):
    c = dpo_config()
    cfg = model_config(c)
    batch, layout = pair_batch(c, tok, cfg, batch_size=8)
    assert batch["tokens"].shape == (8, 2, layout.max_len)
    assert batch["patches"].shape == (8, 2, layout.max_len, layout.patch_dim)
    for i in range(8):  # both sides share the prompt: identical up to the first response token
        c0, r0 = batch["tokens"][i]
        w = batch["text_weights"][i] + batch["image_weights"][i]
        first = int(np.argmax(w[0] > 0))
        np.testing.assert_array_equal(c0[:first + 1], r0[:first + 1])
        assert (w > 0).any(axis=-1).all()
    spec = objectives.get(c).batch_spec(layout, 8)
    assert {k: v[0] for k, v in spec.items()} == {k: batch[k].shape for k in spec}


def test_chunked_model_loss_and_gradients_equal_the_whole_logits_path(tok):
    c = dpo_config()
    cfg = model_config(c)
    batch, layout = pair_batch(c, tok, cfg)
    batch = {k: jnp.asarray(batch[k]) for k in contract.BATCH_KEYS}
    model = family.build(cfg, nnx.Rngs(0))
    reference = family.build(cfg, nnx.Rngs(1))
    ipr = layout.images_per_row(False)

    def run(chunk):
        s = dataclasses.replace(objectives.get(c).settings(c, ipr), chunk_size=chunk, sft_weight=0.2)
        graphdef, params = nnx.split(model)

        def f(p):
            return dpo.dpo_loss(nnx.merge(graphdef, p), batch, settings=s, reference=reference)
        (loss, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
        return loss, metrics, grads

    loss0, m0, g0 = run(0)
    loss1, m1, g1 = run(16)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
    for key in ("reward_chosen", "reward_rejected", "loss_sft"):
        np.testing.assert_allclose(m1[key], m0[key], rtol=1e-5, atol=1e-6)
    assert_grads_close(g1, g0)
    assert float(loss0) > 0 and abs(float(m0["reward_margin"])) > 0


def test_guided_log_probs_match_float64_cfg_of_two_forward_passes(tok):
    """`dpo.guidance` = 3: image codes scored under `uncond + 3 (cond - uncond)`. The float64 side
    builds the null prompt itself (generation prompts blanked to padding but BOS and begin-of-image),
    runs the whole-logits forward on both row sets and guides in numpy; text tokens stay conditional.
    The chunked path's loss and gradients equal the whole-logits path's."""
    c = dpo_config()
    cfg = model_config(c)
    batch, layout = pair_batch(c, tok, cfg)
    rows = dpo.pair_rows({k: jnp.asarray(batch[k]) for k in contract.BATCH_KEYS})
    model = family.build(cfg, nnx.Rngs(0))
    ipr = layout.images_per_row(False)
    tokens = np.asarray(rows["tokens"])
    prompt = (np.asarray(rows["task"]) == contract.T2I) & (np.asarray(rows["modality"]) == contract.TEXT)
    keep = (tokens == cfg.text.bos_token_id) | (tokens == cfg.boi_token_id)
    null = {**rows, "tokens": jnp.asarray(np.where(prompt & ~keep, cfg.text.pad_token_id, tokens))}
    assert (np.asarray(null["tokens"]) != tokens).any() and np.asarray(rows["task"] == contract.MMU).any()

    def whole(r):
        h, targets, _ = forward.lm_hidden(model, r, ipr)
        return (np.asarray(model.text_logits(h), np.float64), np.asarray(model.image_logits(h), np.float64),
                np.asarray(targets))

    text, cond, targets = whole(rows)
    _, uncond, _ = whole(null)
    lsm = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)  # noqa: E731
    pick = lambda lp, t: np.take_along_axis(lp, t[..., None], -1)[..., 0]  # noqa: E731
    k = cfg.vq.num_embeddings
    lp_text = pick(lsm(text), targets)
    lp_image = pick(lsm(uncond + 3.0 * (cond - uncond)), np.clip(targets, 0, k - 1))
    tw, iw = np.asarray(rows["text_weights"]), np.asarray(rows["image_weights"])
    want = (lp_text * tw + lp_image * iw).sum(1)
    for chunk in (0, 16):
        got, n, _ = jax.jit(lambda r, chunk=chunk: dpo.sequence_logps(model, r, ipr, chunk, guidance=3.0))(rows)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    plain, _, _ = dpo.sequence_logps(model, rows, ipr, 0)
    assert np.abs(np.asarray(plain) - want).max() > 1e-2  # guidance changes what is scored

    reference = family.build(cfg, nnx.Rngs(1))

    def run(chunk):
        s = dataclasses.replace(objectives.get(c).settings(c, ipr), chunk_size=chunk, guidance=3.0)
        graphdef, params = nnx.split(model)
        f = lambda p: dpo.dpo_loss(nnx.merge(graphdef, p), batch_j, settings=s, reference=reference)  # noqa: E731
        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    batch_j = {k: jnp.asarray(batch[k]) for k in contract.BATCH_KEYS}
    (l0, _), g0 = run(0)
    (l1, _), g1 = run(16)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    assert_grads_close(g1, g0)


def test_gradient_accumulation_sums_to_the_whole_batch(tok):
    c = dpo_config(grad_accum_steps=2)
    c.dpo.sft_weight = 0.5
    cfg = model_config(c)
    batch, layout = pair_batch(c, tok, cfg)
    batch = {k: jnp.asarray(batch[k]) for k in contract.BATCH_KEYS}
    model, reference = family.build(cfg, nnx.Rngs(0)), family.build(cfg, nnx.Rngs(1))
    loss_fn, _ = objectives.functions(c, layout.images_per_row(False))
    graphdef, params = nnx.split(model)

    def f(p, micro, whole, i):
        kw = {} if whole is None else {"whole": whole}
        return loss_fn(nnx.merge(graphdef, p), micro, reference=reference, **kw)

    m1, g1 = jax.jit(lambda p: steps.accumulated(f, p, batch, 1))(params)
    m2, g2 = jax.jit(lambda p: steps.accumulated(f, p, batch, 2))(params)
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
    assert_grads_close(g2, g1)


def test_reference_copy_holds_only_what_trains_besides_the_adapters():
    """Adapters alone: no copy (the reference is the adapters-off network); routers training beside
    them: exactly their starting values, sharded like them."""
    from configs import stage2
    from unijax import checkpoints
    for trainable, copied in (((), set()), (stage2.TRAINABLE, {"language_model"})):
        c = dpo_config()
        c.model.ffn = "ta_moe"
        c.model.lora.update(rank=4, alpha=8.0)
        c.train.trainable, c.train.frozen, c.mesh.data = trainable, (), 1
        mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
        built = train_setup.build(checkpoints.abstract_model(model_config(c)), c, mesh, abstract=True, reference=True)
        ref = built.frozen.get(steps.REFERENCE, {})
        assert set(ref) == copied
        if copied:
            want = {k: v for k, v in built.state["params"].items() if k != "lora"}
            assert jax.tree.structure(ref) == jax.tree.structure(want)
            assert jax.tree.leaves(built.frozen_sh[steps.REFERENCE]) == jax.tree.leaves(built.state_sh["params"]["language_model"])


def test_ta_moe_lora_reference_is_the_adapters_off_model(tok):
    """The first step compares the model with itself (LoRA's B starts at zero): loss log 2, rewards 0
    (to float32 rounding of the two matmul orders); the second step has moved the adapters; the
    reference has not moved."""
    c = dpo_config(steps=2, warmup_steps=0, learning_rate=1e-2)
    c.model.ffn = "ta_moe"
    c.model.lora.update(rank=4, alpha=8.0)
    c.train.trainable, c.train.frozen, c.mesh.data = (), (), 1
    cfg = model_config(c)
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    built = train_setup.build(family.build(cfg, nnx.Rngs(0)), c, mesh, reference=True)
    assert steps.REFERENCE not in built.frozen and set(built.state["params"]) == {"lora"}
    batch, layout = pair_batch(c, tok, cfg)
    loss_fn, _ = objectives.functions(c, layout.images_per_row(False))
    step = train_setup.jit_train_step(built, c, mesh, loss_fn)
    device_batch = sharding.put_batch({k: batch[k] for k in contract.BATCH_KEYS}, mesh)
    ref_before = nnx.state(steps.reference_model(built.graphdef, built.state["params"], built.frozen))
    state, m = step(built.state, built.frozen, device_batch)
    np.testing.assert_allclose(float(m["loss_dpo"]), math.log(2), rtol=1e-6)
    assert abs(float(m["reward_chosen"])) < 1e-6 and abs(float(m["reward_rejected"])) < 1e-6
    state, m = step(state, built.frozen, device_batch)
    assert float(m["loss_dpo"]) < math.log(2)  # the adapters moved towards the chosen sides
    ref_after = nnx.state(steps.reference_model(built.graphdef, state["params"], built.frozen))
    for a, b in zip(jax.tree.leaves(ref_after), jax.tree.leaves(ref_before)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- formats ---------------------------------------------------------------------------------------------

def _png(path, colour):
    Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(path)


def test_preference_formats_parse_to_pairs_and_bad_records_name_file_and_line(tmp_path):
    for name, colour in (("a.png", 10), ("b.png", 200)):
        _png(tmp_path / name, colour)
    lines = [
        {"question": "what is it?", "image": "a.png", "better_response": "a cat", "worse_response": "a dog"},
        {"question": "what is it?", "image": "a.png", "response_1": "x", "response_2": "y", "overall_response": 2},
        {"prompt": "a red circle", "better_image": "a.png", "worse_image": "b.png"},
        {"prompt": "what is it?", "chosen": "yes", "rejected": "no", "images": ["a.png"]},
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}],
         "chosen": [{"role": "assistant", "content": "red"}], "rejected": [{"role": "assistant", "content": "blue"}],
         "images": ["a.png"]},
        {"prompt": "a blue square", "chosen": "b.png", "rejected": "a.png"},
        {"prompt": "what?", "chosen": "same", "rejected": "same"},
        {"caption": "not a pair", "image": "a.png"},
    ]
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    src = preference.PreferenceJsonl(str(f), str(tmp_path))
    p = [src[i] for i in range(6)]
    assert [x["task"] for x in p] == ["mmu", "mmu", "t2i", "mmu", "mmu", "t2i"]
    assert p[0]["chosen"]["turns"] == [["what is it?", "a cat"]] and p[0]["rejected"]["turns"][0][1] == "a dog"
    assert p[1]["chosen"]["turns"][0][1] == "y" and p[1]["rejected"]["turns"][0][1] == "x"
    assert p[2]["chosen"]["image"][0, 0, 0] == 10 and p[2]["rejected"]["image"][0, 0, 0] == 200
    assert p[4]["chosen"]["turns"] == [["what is it?", "red"]] and len(p[4]["chosen"]["images"]) == 1
    assert p[5]["chosen"]["caption"] == "a blue square" and p[5]["chosen"]["image"][0, 0, 0] == 200
    with pytest.raises(records.BadRecordError, match=rf"{f}: record 6: the chosen and rejected answers are the same"):
        src[6]
    with pytest.raises(records.BadRecordError, match=rf"{f}: record 7: not a preference record"):
        src[7]


def test_pairs_pack_to_arrayrecord_and_read_back_equal(tmp_path):
    """`python -m unijax.pack --pref` stores both sides with their images' bytes; the packed pairs read
    back equal to the JSON Lines ones, and a bad record is skipped and named in the index."""
    from unijax import pack
    from unijax.data.arrayrecord import ArrayRecordSource

    for name, colour in (("a.png", 10), ("b.png", 200)):
        _png(tmp_path / name, colour)
    lines = [{"question": "what is it?", "image": "a.png", "better_response": "a cat", "worse_response": "a dog"},
             {"prompt": "a red circle", "better_image": "a.png", "worse_image": "b.png"},
             {"prompt": "a red circle", "better_image": "a.png", "worse_image": "missing.png"}]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    index = pack.main(["--pref", str(f), "--pref_image_root", str(tmp_path), "--out", str(tmp_path / "packed")])
    (shard,) = index["shards"].values()
    assert shard["records"] == 2 and shard["skipped_records"][0]["index"] == 2
    packed = ArrayRecordSource(sorted(str(p) for p in (tmp_path / "packed").glob("pref-*.arrayrecord")))
    src = preference.PreferenceJsonl(str(f), str(tmp_path))
    for i in range(2):
        a, b = src[i], packed[i]
        assert a["task"] == b["task"]
        for side in preference.SIDES:
            for key in ("turns", "caption"):
                assert a[side].get(key) == b[side].get(key)
            imgs_a = a[side].get("images") or [a[side].get("image")]
            imgs_b = b[side].get("images") or [b[side].get("image")]
            for x, y in zip(imgs_a, imgs_b):
                np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("key,value", [("beta", 0.0), ("loss_type", "hinge"), ("label_smoothing", 0.5),
                                       ("sft_weight", -1.0), ("guidance", 0.5)])
def test_bad_dpo_settings_are_refused_naming_the_key(key, value):
    c = dpo_config()
    c.dpo[key] = value
    with pytest.raises(ValueError, match=f"dpo.{key}="):
        objectives.get(c).check(c)
