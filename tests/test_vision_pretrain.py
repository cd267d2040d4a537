"""Vision pre-training (identity tagging of shapes images): targets, the tagger against numpy,
learning, the tower cache, sharded == unsharded, and the loop's use of it."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file
from test_train import losses_of, tiny_config

from configs import base
from unijax import checkpoints, sharding
from unijax.analysis import recipe
from unijax.checkpoints import flat_params
from unijax.data import shapes
from unijax.models import family
from unijax.models.family import preset
from unijax.models.janus import Janus
from unijax.training import loop, vision_pretrain
from unijax.training.config import model_config, validate
from unijax.training.logger import MetricLogger


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def pretrain_config(**v):
    c = base.get_config()
    c.vision_pretrain.update(steps=4, batch_size=8, eval_images=16, log_every=2, warmup_steps=1)
    c.vision_pretrain.update(**v)
    return c


def tower(model):
    return {k: np.asarray(v) for k, v in flat_params(model.vision_model).items()}


def test_tags_are_the_scene_identities():
    src = vision_pretrain.TagSource(seed=3, image_size=32)
    for index in range(20):
        scene = shapes.sample_scene(np.random.default_rng([3, 2, index]), 32)
        item = src[index]
        np.testing.assert_array_equal(item["image"], shapes.render(scene))
        want = {(o.shape, o.colour) for o in scene.objects}
        got = {shapes.IDENTITIES[i] for i in np.flatnonzero(item["tags"])}
        assert got == want and item["tags"].sum() == len(want)


def test_patch_labels_name_the_object_covering_each_patch():
    """Against a pixel-by-pixel reference: each patch's label is the identity of the object whose own
    rendering covers most of its pixels when that share is >= 1/4, else background."""
    for index in range(30):
        scene = shapes.scene_at(5, index)
        got = vision_pretrain.patch_labels(scene, 4)
        masks = [shapes.render(shapes.Scene((o,), 32)).any(-1) for o in scene.objects]
        for p in range(64):
            r, c = divmod(p, 8)
            shares = [m[4 * r:4 * r + 4, 4 * c:4 * c + 4].sum() / 16 for m in masks]
            k = int(np.argmax(shares))
            want = (vision_pretrain.IDENTITY_INDEX[scene.objects[k].shape, scene.objects[k].colour]
                    if shares[k] >= 0.25 else vision_pretrain.BACKGROUND_LABEL)
            assert got[p] == want, (index, p, shares)
        assert (got != vision_pretrain.BACKGROUND_LABEL).any()
    assert vision_pretrain.TagSource(5, 32, 8)[0]["patches"].shape == (16,)


def test_tagger_matches_numpy():
    tagger = vision_pretrain.IdentityTagger(16, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(3, 10, 16))
    q = np.asarray(tagger.queries[...], np.float64)
    w, b = np.asarray(tagger.out.kernel[...], np.float64), np.asarray(tagger.out.bias[...], np.float64)
    s = np.einsum("qd,bpd->bqp", q, x) / np.sqrt(16)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    want = (np.einsum("bqp,bpd->bqd", a, x) @ w + b)[..., 0]
    np.testing.assert_allclose(np.asarray(tagger(x.astype(np.float32))), want, rtol=1e-5, atol=1e-5)


def test_tagging_scores_against_hand_values():
    logits = np.array([[3.0, -2.0], [-1.0, -4.0]])
    tags = np.array([[1.0, 0.0], [1.0, 0.0]])
    s = vision_pretrain.tagging_scores(logits, tags)
    bce = np.log1p(np.exp(-3.0)) + np.log1p(np.exp(-2.0)), np.log1p(np.exp(1.0)) + np.log1p(np.exp(-4.0))
    assert s["loss"] == pytest.approx(np.mean(bce), rel=1e-12)
    assert s["blind_loss"] == pytest.approx(0.0, abs=1e-9)  # each label is constant on this set
    assert s["exact_set"] == 0.5 and s["tag_accuracy"] == 0.75


def test_pretraining_learns_to_tag_and_caches_the_tower(tmp_path, monkeypatch):
    """120 steps x 32 images: the held-out tagging loss falls well below the best image-blind one
    (per-label frequencies); a second run with the same settings restores the tower, bit for bit,
    without training; other settings train again."""
    c = pretrain_config(steps=120, batch_size=32, eval_images=256, log_every=40, warmup_steps=10)
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    model = Janus(preset("tiny"), rngs=nnx.Rngs(0))
    before = tower(model)
    log = MetricLogger(tmp_path / "log", 1)
    scores = vision_pretrain.pretrain_vision(model, c, mesh, log, cache_dir=tmp_path / "cache")
    assert scores["loss"] < 0.8 * scores["blind_loss"], scores
    trained = tower(model)
    assert any(not np.array_equal(before[k], trained[k]) for k in trained)
    info = json.loads((tmp_path / "cache" / "info.json").read_text())
    assert info["scores"] == scores

    def no_training(*a, **k):
        raise AssertionError("the cached tower should have been restored")

    monkeypatch.setattr(vision_pretrain, "_train", no_training)
    fresh = Janus(preset("tiny"), rngs=nnx.Rngs(0))
    assert vision_pretrain.pretrain_vision(fresh, c, mesh, log, cache_dir=tmp_path / "cache") == scores
    for k, v in tower(fresh).items():
        np.testing.assert_array_equal(v, trained[k], err_msg=k)
    c.vision_pretrain.learning_rate = 1e-3
    with pytest.raises(AssertionError, match="cached tower"):
        vision_pretrain.pretrain_vision(fresh, c, mesh, log, cache_dir=tmp_path / "cache")
    log.close()


def test_pretraining_on_a_mesh_matches_one_device(tmp_path):
    """data=2 x fsdp=2 (batch split over 4 devices) against one device: same tower within float32
    tolerance (rtol 1e-4, atol 1e-5) after 4 steps."""
    towers = []
    for devices, mesh_cfg in ((jax.devices()[:1], dict(data=1, fsdp=1)), (jax.devices()[:4], dict(data=2, fsdp=2))):
        c = pretrain_config()
        c.mesh.update(**mesh_cfg)
        model = Janus(preset("tiny"), rngs=nnx.Rngs(0))
        log = MetricLogger(tmp_path / str(len(devices)), 1)
        vision_pretrain.pretrain_vision(model, c, sharding.make_mesh(c.mesh, devices), log)
        log.close()
        towers.append(tower(model))
    for k in towers[0]:
        np.testing.assert_allclose(towers[1][k], towers[0][k], rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.slow
def test_resume_with_a_frozen_pretrained_tower(tmp_path, data_dir):
    """The frozen tower is in no training checkpoint: stopping after step 2 and rerunning restores
    it from `<workdir>/vision_pretrain` without training it again, so the model trained after the
    resume holds exactly the pre-trained tower (not a fresh initialisation)."""
    def config(steps):
        c = tiny_config(tmp_path, data_dir, steps=steps, checkpoint_every=2, frozen=("vqmodel/.*", "vision_model/.*"))
        c.vision_pretrain.update(steps=3, batch_size=8, eval_images=16, log_every=1, warmup_steps=1)
        return c

    loop.train(config(2), devices=jax.devices()[:1])
    cached = load_file(str(tmp_path / "vision_pretrain" / "vision_model.safetensors"))
    loop.train(config(4), devices=jax.devices()[:1])  # resumes at step 2
    assert sorted(losses_of(tmp_path)) == [1, 2, 3, 4]
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum("vision_pretrain/exact_set" in r for r in rows) == 1  # trained once, restored on resume
    final = tower(checkpoints.load_model(tmp_path / "model"))
    assert set(final) == set(cached)
    for k, v in cached.items():
        np.testing.assert_array_equal(final[k], v, err_msg=k)


@pytest.mark.slow
def test_adaptor_warmup_trains_only_the_adaptors_then_the_run_starts_from_it(tmp_path, data_dir):
    """`adaptor_warmup.steps`: after the vision pre-training, the warm-up trains with the decoder frozen (its
    model's decoder is exactly the fresh initialisation of the same seed, its aligner is not); the run then
    starts from that model (its tower is not pre-trained again) and trains the decoder; a rerun reuses the
    warm-up. A run that does not pre-train its tower has no warm-up."""
    c = tiny_config(tmp_path, data_dir, steps=2)
    c.vision_pretrain.update(steps=3, batch_size=8, eval_images=16, log_every=1, warmup_steps=1)
    c.adaptor_warmup.steps = 2
    assert loop.adaptor_warmup_dir(c) == tmp_path / "adaptor_warmup"
    loop.train(c, devices=jax.devices()[:1])
    fresh = flat_params(family.build(model_config(c), nnx.Rngs(c.seed)))
    warmed = flat_params(checkpoints.load_model(tmp_path / "adaptor_warmup" / "model"))
    final = flat_params(checkpoints.load_model(tmp_path / "model"))
    decoder = [k for k in fresh if k.startswith(("language_model.", "lm_head."))]
    aligner = [k for k in fresh if k.startswith("aligner.")]
    assert decoder and aligner
    for k in decoder:
        np.testing.assert_array_equal(np.asarray(warmed[k]), np.asarray(fresh[k]), err_msg=k)
    assert all(not np.array_equal(np.asarray(warmed[k]), np.asarray(fresh[k])) for k in aligner)
    assert any(not np.array_equal(np.asarray(final[k]), np.asarray(warmed[k])) for k in decoder)
    for k in (k for k in final if k.startswith("vision_model.")):  # the run's tower: the warm-up's, then trained
        assert k in warmed
    def rows(d):
        return [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert sum("vision_pretrain/exact_set" in r for r in rows(tmp_path / "adaptor_warmup")) == 1
    assert not any("vision_pretrain/exact_set" in r for r in rows(tmp_path))
    warm_rows = len(rows(tmp_path / "adaptor_warmup"))
    c.train.steps = 3  # rerun: resumes the run, reuses the warm-up
    loop.train(c, devices=jax.devices()[:1])
    assert len(rows(tmp_path / "adaptor_warmup")) == warm_rows and sorted(losses_of(tmp_path)) == [1, 2, 3]
    for off in ({"adaptor_warmup.steps": 0}, {"vision_pretrain.steps": 0}, {"model.family": "emu3"},
                {"init_from": str(tmp_path / "model")}):
        d = c.copy_and_resolve_references()
        for key, value in off.items():
            recipe.set_key(d, key, value)
        assert loop.adaptor_warmup_dir(d) is None, off
    bad = tiny_config(tmp_path / "bad", data_dir, trainable=("language_model/.*", "lm_head/.*"))  # a language stage
    bad.adaptor_warmup.steps = 2
    with pytest.raises(ValueError, match="adaptor_warmup.steps=2: train.trainable"):
        validate(bad)


def test_vision_pretraining_needs_the_shapes_world(tmp_path, data_dir):
    c = tiny_config(tmp_path, data_dir)
    c.vision_pretrain.steps = 5
    c.data.source = "files"
    with pytest.raises(ValueError, match="vision_pretrain.steps"):
        loop.train(c, devices=jax.devices()[:1])
    c.data.source = "shapes"
    c.vision_pretrain.batch_size = 0
    with pytest.raises(ValueError, match="vision_pretrain.batch_size"):
        loop.train(c, devices=jax.devices()[:1])
