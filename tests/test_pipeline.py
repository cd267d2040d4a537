"""The batch contract: token layouts, image patches, packing, mixing, process sharding, iterator state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from unijax import contract
from unijax.contract import GEN_IMAGE, TEXT, UND_IMAGE
from unijax.data import datasets, pipeline, shapes
from unijax.data.tokenizer import shapes_tokenizer
from unijax.models import forward, image_inputs
from unijax.models.family import preset
from unijax.models.janus import Janus
from unijax.training import losses
from unijax.training.config import validate


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return shapes_tokenizer(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def cfg():
    return preset("tiny")


def stream(tok, cfg, *, batch_size=8, packing=False, max_len=128, seed=0, und=1.0, gen=1.0, **kw):
    c = base.get_config()
    c.data.und_ratio, c.data.gen_ratio, c.data.turns_per_image = und, gen, 1
    layout = pipeline.Layout.from_model(cfg, max_len, 0.0)
    ds, w = datasets.task_datasets(c.data, layout.image_size, seed)
    return iter(pipeline.batches(ds, w, tokenizer=tok, layout=layout, batch_size=batch_size, seed=seed,
                                 packing=packing, kinds=shapes.KINDS, **kw)), layout


def test_layout_of_each_task(tok, cfg):
    it, layout = stream(tok, cfg)
    b = next(it)
    for row in range(8):
        n = int(b["segment_ids"][row].sum())
        toks, mod = b["tokens"][row], b["modality"][row]
        assert toks[0] == tok.bos_id and np.all(b["segment_ids"][row, n:] == 0)
        assert np.array_equal(b["positions"][row, :n], np.arange(n))
        if b["task"][row, 0] == contract.MMU:
            img = np.flatnonzero(mod == UND_IMAGE)
            assert len(img) == layout.und_tokens and np.all(toks[img] == tok.image_id)
            assert toks[img[0] - 1] == tok.boi_id and toks[img[-1] + 1] == tok.eoi_id
            # loss on exactly the answer + eos: the last weighted position predicts eos, the final token
            w = np.flatnonzero(b["text_weights"][row])
            assert w[-1] == n - 2 and toks[n - 1] == tok.eos_id and b["image_weights"][row].sum() == 0
            assert tok.decode(toks[w + 1]).strip() != ""
        else:
            gen = np.flatnonzero(mod == GEN_IMAGE)
            assert len(gen) == layout.gen_tokens and toks[gen[0] - 1] == tok.boi_id
            assert np.array_equal(np.flatnonzero(b["image_weights"][row]), gen - 1)  # boi .. second-to-last code
            assert b["text_weights"][row].sum() == 0 and toks[n - 1] == tok.eoi_id


def test_patches_reassemble_the_image(tok, cfg):
    """gather_images(patches) inverts the pipeline's patch layout exactly, for both image kinds."""
    src = datasets.ShapesSource("mmu", 0, 32)
    gsrc = datasets.ShapesSource("t2i", 0, 32)
    layout = pipeline.Layout.from_model(cfg, 128)
    for s, kind, patch, grid in ((src[5], UND_IMAGE, cfg.vision.patch_size, 8), (gsrc[5], GEN_IMAGE, 4, 8)):
        x = pipeline.pad_sample(pipeline.encode_sample(s, tok, layout), 128)
        img = image_inputs.gather_images(jnp.asarray(x["patches"][None]), jnp.asarray(x["modality"][None] == kind), 1,
                                   patch, grid)
        want = s["image"].astype(np.float32) / 127.5 - 1
        np.testing.assert_allclose(np.asarray(img[0, 0]), want, atol=1e-6)


def test_packed_rows_give_the_same_loss(tok, cfg):
    """A packed batch (several samples per row, segment masking, restarted positions) gives the same
    per-task losses as the same samples one per row. Tolerance 1e-5 relative (float32)."""
    layout = pipeline.Layout.from_model(cfg, 128)
    src = [datasets.ShapesSource("mmu", 3, 32)[i] for i in range(3)] + \
          [datasets.ShapesSource("t2i", 3, 32)[i] for i in range(3)]
    samples = [pipeline.encode_sample(s, tok, layout) for s in src]
    padded = [pipeline.pad_sample(s, 128) for s in samples]
    unpacked = {k: np.stack([p[k] for p in padded]) for k in contract.BATCH_KEYS}
    # pack pairs by hand into rows of 256
    rows = []
    for a, b in ((0, 3), (1, 4), (2, 5)):
        row = {k: np.concatenate([samples[a][k], samples[b][k]]) for k in contract.SEQ_FEATURES}
        n_a, n_b = len(samples[a]["tokens"]), len(samples[b]["tokens"])
        row = {k: np.pad(v, [(0, 256 - len(v))] + [(0, 0)] * (v.ndim - 1)) for k, v in row.items()}
        row["segment_ids"] = np.pad(np.r_[np.ones(n_a), 2 * np.ones(n_b)], (0, 256 - n_a - n_b)).astype(np.int32)
        row["positions"] = np.pad(np.r_[np.arange(n_a), np.arange(n_b)], (0, 256 - n_a - n_b)).astype(np.int32)
        rows.append(row)
    packed = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    model = Janus(cfg, rngs=nnx.Rngs(0))
    loss = nnx.jit(lambda m, b: losses.lm_loss(m, b, images_per_row=(1, 1))[1])  # one compile per row length
    m1, m2 = loss(model, jax.tree.map(jnp.asarray, unpacked)), loss(model, jax.tree.map(jnp.asarray, packed))
    for k in ("loss_text", "loss_image"):
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-5)


def test_grain_packing_fills_rows(tok, cfg):
    it, layout = stream(tok, cfg, packing=True, max_len=256, batch_size=4)
    b = next(it)
    assert b["tokens"].shape == (4, 256)
    segs = b["segment_ids"].max(axis=1)
    assert segs.min() >= 2, segs  # ~85-token samples: at least 2 per 256-token row
    for row in range(4):
        for s in range(1, segs[row] + 1):
            pos = b["positions"][row][b["segment_ids"][row] == s]
            assert np.array_equal(pos, np.arange(len(pos)))


def test_packed_rows_name_their_skipped_samples(tok, cfg):
    """A packed row holds several samples; each skipped one (one token flagged `bad`) is named by
    `skipped_in`, so a packed run counts skipped records once each, like an unpacked one."""
    it, _ = stream(tok, cfg, packing=True, max_len=84, batch_size=4, gen=0.2)
    named = flagged = 0
    for _ in range(3):
        b = next(it)
        entries = pipeline.skipped_in(b)
        flagged += int(np.sum(b["bad"] == pipeline.OVERFLOW))
        named += len(entries)
        assert all(e["why"] == "overflow" and e["source"] == "shapes" and e["index"] >= 0 for e in entries)
    assert flagged > 0 and named == flagged


def test_mixing_ratio(tok, cfg):
    it, _ = stream(tok, cfg, batch_size=30, und=1.0, gen=2.0)
    tasks = np.concatenate([next(it)["task"][:, 0] for _ in range(4)])
    assert abs(np.mean(tasks == contract.T2I) - 2 / 3) < 0.05


def test_process_shards_stack_to_the_global_batch(tok, cfg):
    """Process p's rows are block p of the one-process global batch, at every step (same random draws)."""
    g, _ = stream(tok, cfg, batch_size=8)
    p0, _ = stream(tok, cfg, batch_size=4, process_index=0, process_count=2)
    p1, _ = stream(tok, cfg, batch_size=4, process_index=1, process_count=2)
    for _ in range(2):
        whole, a, b = next(g), next(p0), next(p1)
        for k in contract.BATCH_KEYS:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), whole[k], err_msg=k)


def test_iterator_state_restores_the_stream(tok, cfg):
    it, _ = stream(tok, cfg)
    next(it)
    state = it.get_state()
    want = [next(it)["tokens"] for _ in range(2)]
    it2, _ = stream(tok, cfg)
    it2.set_state(state)
    got = [next(it2)["tokens"] for _ in range(2)]
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w, g)


def test_worker_processes_give_the_same_batches(tok, cfg):
    a, _ = stream(tok, cfg, batch_size=4)
    b, _ = stream(tok, cfg, batch_size=4, num_workers=2)
    for _ in range(3):
        x, y = next(a), next(b)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_too_long_sample_follows_data_overflow(tok, cfg):
    """`error` names the record; `skip` (the default) yields one token flagged OVERFLOW; `truncate`
    keeps the turns that fit (exactly the layout of those turns alone)."""
    s = datasets.ShapesSource("mmu", 0, 32)[0]
    with pytest.raises(ValueError, match=r"shapes: record 0: 82 tokens do not fit data.max_len=70"):
        pipeline.encode_sample(s, tok, pipeline.Layout.from_model(cfg, 70, overflow="error"))
    x = pipeline.encode_sample(s, tok, pipeline.Layout.from_model(cfg, 70))
    assert x["bad"].tolist() == [pipeline.OVERFLOW] and x["text_weights"].sum() == 0
    long = datasets.ShapesSource("mmu", 0, 32, turns=4)[3]
    full = pipeline.encode_sample(long, tok, pipeline.Layout.from_model(cfg, 1000))
    two = pipeline.encode_sample({**long, "turns": long["turns"][:2]}, tok, pipeline.Layout.from_model(cfg, 1000))
    limit = len(two["tokens"]) + 2
    assert len(full["tokens"]) > limit
    cut = pipeline.encode_sample(long, tok, pipeline.Layout.from_model(cfg, limit, overflow="truncate"))
    for k in ("tokens", "modality", "text_weights", "patches"):
        np.testing.assert_array_equal(cut[k], two[k])
    with pytest.raises(ValueError, match="data.overflow='cut'"):
        pipeline.Layout.from_model(cfg, 70, overflow="cut")


def test_text_only_and_multi_image_conversations(tok, cfg):
    """A text-only conversation has no image slots; a two-image one gets an image block at each
    mark, in order, whose patches are the two preprocessed images; more images than
    data.max_images are skipped as overflow; the train step's rows hold max_images images."""
    from unijax.data import images as image_rules

    layout = pipeline.Layout.from_model(cfg, 200, max_images=2)
    x = pipeline.encode_sample({"task": "mmu", "image": None, "turns": [["what is red?", "a colour"]]}, tok, layout)
    assert (x["modality"] == TEXT).all() and x["text_weights"].sum() > 0
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (32, 32, 3), np.uint8), rng.integers(0, 256, (20, 40, 3), np.uint8)
    turns = [["<image> is left of <image>. which is red?", "the first"]]
    y = pipeline.encode_sample({"task": "mmu", "images": [a, b], "turns": turns}, tok, layout)
    und = y["modality"] == UND_IMAGE
    assert und.sum() == 2 * layout.und_tokens
    starts = np.flatnonzero(np.diff(np.concatenate([[0], und.astype(int)])) == 1)
    assert len(starts) == 2 and (y["tokens"][starts - 1] == tok.boi_id).all()
    text_between = y["tokens"][starts[0] + layout.und_tokens + 1:starts[1] - 1]
    assert tok.decode(text_between).strip() == "is left of"
    want = np.concatenate([pipeline.image_patches(layout.und_image(im), layout.und_patch, layout.patch_dim)
                           for im in (a, image_rules.resize_pad(b, 32))])
    np.testing.assert_array_equal(y["patches"][und], want)
    assert layout.images_per_row(False) == (2, 1)
    three = {"task": "mmu", "images": [a, a, a], "turns": [["<image><image><image> same?", "yes"]]}
    assert pipeline.encode_sample(three, tok, layout)["bad"].tolist() == [pipeline.OVERFLOW]
    with pytest.raises(ValueError, match="2 images but 1 '<image>' marks"):
        tok.mmu_ids([["<image> what?", "x"]], 4, num_images=2)


def test_multi_turn_chat_weights_every_answer(tok, cfg):
    layout = pipeline.Layout.from_model(cfg, 160)
    s = datasets.ShapesSource("mmu", 0, 32, turns=3)[7]
    assert len(s["turns"]) == 3 and len({q for q, _ in s["turns"]}) == 3
    x = pipeline.encode_sample(s, tok, layout)
    answers = x["tokens"][1:][x["text_weights"][:-1] > 0]
    want = sum((tok.encode(" " + a) + [tok.eos_id] for _, a in s["turns"]), [])
    assert answers.tolist() == want
    assert (x["modality"] == UND_IMAGE).sum() == layout.und_tokens  # the image comes once, in turn 1


def test_shapes_source_with_narrow_question_kinds():
    """data.question_kinds=colour: scenes that admit no colour question (three circles) are
    redrawn deterministically instead of failing the run; every sample asks a colour question."""
    src = datasets.ShapesSource("mmu", 0, 32, kinds=("colour",))
    samples = [src[i] for i in range(300)]
    assert {s["kind"] for s in samples} == {"colour"}
    assert [s["turns"] for s in samples[:20]] == [src[i]["turns"] for i in range(20)]


def test_eval_reports_the_predicted_first_answer_token(tok, cfg):
    """lm_eval's `first_answer` is the text head's argmax at the position predicting each MMU row's
    first answer token (numpy from lm_forward's logits); answer_mode_share is the modal share."""
    from unijax.training.evaluators import answer_mode_share

    it, _ = stream(tok, cfg, batch_size=8)
    batch = {k: jnp.asarray(v) for k, v in next(it).items() if k in contract.BATCH_KEYS}
    model = Janus(cfg, rngs=nnx.Rngs(1))
    out = nnx.jit(lambda m, b: losses.lm_eval(m, b, images_per_row=(1, 1)))(model, batch)
    logits = np.asarray(nnx.jit(lambda m, b: forward.lm_forward(m, b, (1, 1))[0])(model, batch))
    tw = np.asarray(batch["text_weights"])
    rows = np.flatnonzero(tw.sum(1) > 0)
    assert len(rows) and np.array_equal(np.flatnonzero(np.asarray(out["answered"])), rows)
    for r in rows:
        assert int(out["first_answer"][r]) == int(np.argmax(logits[r, np.flatnonzero(tw[r])[0]]))
    assert answer_mode_share(np.array([5, 5, 7, 5])) == 0.75 and answer_mode_share(np.array([3, 3])) == 1.0


def test_question_weights_shape_the_training_mix_only(tok, cfg):
    """`data.question_weights` reweights the training stream's question families; the held-out
    evaluator's batches (`mix=False`) keep the uniform mix, so scores stay comparable across mixes."""
    c = base.get_config()
    c.data.gen_ratio, c.data.turns_per_image = 0.0, 1

    def kinds(**kw):
        (ds,), _ = datasets.task_datasets(c.data, 32, 5, **kw)
        return [ds[i]["kind"] for i in range(200)]

    uniform = kinds()
    c.data.question_weights = "exist=50"
    weighted, held_out = kinds(), kinds(mix=False)
    exist = [sum(k.startswith("exist_") for k in ks) / len(ks) for ks in (uniform, weighted)]
    assert exist[0] < 0.3 and exist[1] > 0.8, exist
    assert held_out == uniform
    c.data.question_weights = "exist:2"
    with pytest.raises(ValueError, match="data.question_weights"):
        kinds()


def test_scene_text_samples_are_text_only_and_skip_the_image_encoders(tok, cfg):
    """`data.scene_text` (the language stage): the same scene and questions as the image source, the
    scene given in words, no image slots; its layout runs no image encoder, and the logits equal
    those of the step that runs both encoders on the (absent) images. Tolerance 1e-6 absolute."""
    img, txt = datasets.ShapesSource("mmu", 4, 32, turns=3), datasets.ShapesSource("mmu", 4, 32, turns=3,
                                                                                   scene_text=True)
    for i in range(5):
        a, b = img[i], txt[i]
        assert "image" not in b and b["kind"] == a["kind"]
        scene = shapes.sample_scene(np.random.default_rng([4, 0, i]), 32)  # the source's scene i
        assert b["turns"][0][0] == f"scene: {shapes.caption(scene)}.\n{a['turns'][0][0]}"
        assert b["turns"][1:] == a["turns"][1:]
    c = base.get_config()
    c.data.scene_text, c.data.gen_ratio = True, 0.0
    layout = pipeline.Layout.for_data(cfg, c.data)
    assert layout.images_per_row(False) == (0, 0) and layout.images_per_row(True) == (0, 0)
    c.data.gen_ratio = 1.0
    assert pipeline.Layout.for_data(cfg, c.data).images_per_row(False) == (0, 1)
    x = [pipeline.pad_sample(pipeline.encode_sample(txt[i], tok, layout), 112) for i in range(4)]
    batch = {k: jnp.asarray(np.stack([r[k] for r in x])) for k in contract.BATCH_KEYS}
    assert not np.any(np.asarray(batch["modality"]) != TEXT)
    model = Janus(cfg, rngs=nnx.Rngs(0))
    skip, _, _, _ = forward.lm_forward(model, batch, (0, 0))
    both, _, _, _ = forward.lm_forward(model, batch, (1, 1))
    np.testing.assert_allclose(np.asarray(skip), np.asarray(both), atol=1e-6)
    c.data.source = "files"
    with pytest.raises(ValueError, match="data.scene_text"):
        validate(c)


def test_repeats_of_a_small_held_out_file_count_once(tok, cfg, tmp_path):
    """Two caption records drawn into batches of 4 rows come round twice: `distinct_rows` keeps the
    first row of each record and blanks the repeats (no token, no weight), so statistics see 2."""
    import grain
    from PIL import Image

    from unijax.data import shapes
    from unijax.data.sources import CaptionSource

    for i in range(2):
        Image.fromarray(shapes.render(shapes.scene_at(0, i))).save(tmp_path / f"{i}.png")
    (tmp_path / "caps.jsonl").write_text("".join(f'{{"image": "{i}.png", "caption": "a red circle"}}\n'
                                                 for i in range(2)))
    layout = pipeline.Layout.from_model(cfg, 160)
    ds = pipeline.repeat_epochs(grain.MapDataset.source(CaptionSource(tmp_path / "caps.jsonl", tmp_path)), seed=0)
    batch = next(iter(pipeline.batches([ds], [1.0], tokenizer=tok, layout=layout, batch_size=4, seed=0)))
    origins = list(batch["origin"])
    assert len(set(origins)) == 2 and all(o.endswith((":0", ":1")) for o in origins)
    (out,) = pipeline.distinct_rows([batch])
    kept = (out["segment_ids"] > 0).any(axis=1)
    assert kept.sum() == 2 and sorted(np.asarray(origins)[kept]) == sorted(set(origins))
    assert not out["image_weights"][~kept].any() and (batch["segment_ids"] > 0).any(axis=1).all()
