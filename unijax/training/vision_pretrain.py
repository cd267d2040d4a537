"""Vision pre-training on the shapes world: the from-scratch stand-in for Janus-Pro's pretrained SigLIP.

A from-scratch SigLIP tower never learns to see shape from the decoder's answer tokens alone
(README, "Training"), while the same decoder reads shape at once from a tower that already
encodes it. Janus-Pro starts from a pretrained SigLIP-L; on the shapes world, this phase plays
that part: before the first train step of a fresh run, `vision_pretrain.steps` steps train
`vision_model` to tag which (shape, colour) identities each image holds.

The tagger is an attention pool with one learned query per identity over the tower's patch
features, then one logit per identity (multi-label sigmoid cross-entropy). Only the tower is
kept: the tagger is dropped after the phase, like SigLIP's text tower. Pooling over patches
(rather than reading a CLS token) makes every patch feature say what lies under it, which is what
the decoder's cross-attention to image tokens reads for colour, shape, existence and position
questions.

The trained tower is cached in `<workdir>/vision_pretrain/` (`vision_model.safetensors` + `info.json`
with the phase's settings and held-out scores), so a resumed run, or a second run in the same
workdir with the same settings, restores it instead of training it again; this matters when
`train.frozen` keeps the tower out of the training checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import pathlib
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from safetensors.numpy import load_file, save_file

from unijax import sharding
from unijax.checkpoints import flat_params
from unijax.data import datasets, shapes
from unijax.distributed import to_host
from unijax.io import atomic_directory
from unijax.models import family as families
from unijax.models.config import family_of
from unijax.training import setup as train_setup

IDENTITY_INDEX = {identity: i for i, identity in enumerate(shapes.IDENTITIES)}
EVAL_SEED_OFFSET = 7_000_003  # held-out images: a scene stream the training phase never draws


BACKGROUND_LABEL = len(shapes.IDENTITIES)  # a patch label: no object covers the patch


def patch_labels(scene: shapes.Scene, patch_size: int) -> np.ndarray:
    """int32 `[P]` (row-major patches of `patch_size` pixels): the identity index of the object that
    covers most of each patch's pixels, or BACKGROUND_LABEL when objects cover under a quarter of it."""
    g = scene.size // patch_size
    labels = np.full(g * g, BACKGROUND_LABEL, np.int32)
    if not scene.objects:
        return labels
    cover = np.stack([  # [objects, P]: the share of each patch's pixels the object covers
        shapes.render(shapes.Scene((o,), scene.size)).any(-1)[: g * patch_size, : g * patch_size]
        .reshape(g, patch_size, g, patch_size).mean((1, 3)).ravel() for o in scene.objects])
    ids = np.array([IDENTITY_INDEX[(o.shape, o.colour)] for o in scene.objects], np.int32)
    owner = cover.argmax(0)
    return np.where(cover.max(0) >= 0.25, ids[owner], labels).astype(np.int32)


class TagSource:
    """index -> {"image": uint8 [S, S, 3], "tags": float32 [len(IDENTITIES)] multi-hot, "patches": int32
    [P] per-patch identity (`patch_labels`; BACKGROUND_LABEL where no object is)}."""

    def __init__(self, seed: int, image_size: int, patch_size: int = 4):
        self.seed, self.image_size, self.patch_size = int(seed), int(image_size), int(patch_size)

    def __len__(self) -> int:
        return datasets.WORLD_SIZE

    def __getitem__(self, index: int) -> dict:
        scene = shapes.sample_scene(np.random.default_rng([self.seed, 2, int(index)]), self.image_size)
        tags = np.zeros(len(shapes.IDENTITIES), np.float32)
        for o in scene.objects:
            tags[IDENTITY_INDEX[(o.shape, o.colour)]] = 1.0
        return {"image": shapes.render(scene), "tags": tags, "patches": patch_labels(scene, self.patch_size)}


class IdentityTagger(nnx.Module):
    """Patch features `[B, P, D]` -> one logit per shapes identity `[B, len(IDENTITIES)]`."""

    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.queries = nnx.Param(jax.random.normal(rngs.params(), (len(shapes.IDENTITIES), width)) * 0.1)
        self.out = nnx.Linear(width, 1, rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        scale = 1.0 / np.sqrt(features.shape[-1])
        attn = jax.nn.softmax(jnp.einsum("qd,bpd->bqp", self.queries[...], features) * scale, axis=-1)
        return self.out(jnp.einsum("bqp,bpd->bqd", attn, features))[..., 0]


class _Tagged(nnx.Module):
    """The tower with both heads: the pooled identity-set tagger and a linear per-patch classifier
    (identity or background) that makes each patch feature say, linearly, what lies under it."""

    def __init__(self, vision_model, width: int, *, rngs: nnx.Rngs):
        self.vision_model = vision_model
        self.tagger = IdentityTagger(width, rngs=rngs)
        self.patch_head = nnx.Linear(width, BACKGROUND_LABEL + 1, rngs=rngs)

    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        features = self.vision_model(pixels)
        return self.tagger(features), self.patch_head(features)


def _pixels(images: jax.Array) -> jax.Array:
    return images.astype(jnp.float32) / 127.5 - 1.0  # the pipeline's understanding-image range


def validate(config) -> None:
    v = config.vision_pretrain
    if int(v.steps) < 0:
        raise ValueError(f"vision_pretrain.steps={v.steps} must be >= 0 (0 = no vision pre-training)")
    if int(v.steps) == 0:
        return
    if config.data.source != "shapes":
        raise ValueError(f"vision_pretrain.steps={v.steps} needs data.source='shapes' (it tags shapes-world "
                         f"images), got data.source={config.data.source!r}; set vision_pretrain.steps=0")
    for key in ("batch_size", "eval_images", "log_every"):
        if int(v[key]) <= 0:
            raise ValueError(f"vision_pretrain.{key}={v[key]} must be positive")


def tagging_scores(logits: np.ndarray, tags: np.ndarray) -> dict[str, float]:
    """Held-out tagging scores from logits and multi-hot targets `[N, labels]`: `loss` (sigmoid
    cross-entropy summed over labels, mean over images), `blind_loss` (the same for the best
    image-blind predictor: each label's held-out frequency), `exact_set` and `tag_accuracy`."""
    logits, tags = np.asarray(logits, np.float64), np.asarray(tags, np.float64)
    loss = np.logaddexp(0.0, logits) - tags * logits
    p = np.clip(tags.mean(0), 1e-12, 1 - 1e-12)
    blind = -(p * np.log(p) + (1 - p) * np.log1p(-p)).sum()
    pred, truth = logits > 0, tags > 0
    return {"loss": float(loss.sum(-1).mean()), "blind_loss": float(blind),
            "exact_set": float((pred == truth).all(-1).mean()), "tag_accuracy": float((pred == truth).mean())}


def _optimizer_config(config) -> ml_collections.ConfigDict:
    """`train.*` AdamW settings with the phase's own steps, batch, peak learning rate and warmup."""
    t = ml_collections.ConfigDict(config.train.to_dict())
    v = config.vision_pretrain
    t.update(steps=int(v.steps), learning_rate=float(v.learning_rate), warmup_steps=int(v.warmup_steps), lr_scales=(),
             grad_accum_steps=1)
    return t


def _settings(model, config) -> dict:
    """What the cached tower depends on: a cache made under other settings is not reused."""
    train = {k: config.train[k] for k in ("min_lr_ratio", "weight_decay", "grad_clip", "b1", "b2", "eps")}
    return {"vision": dataclasses.asdict(model.cfg.vision), "vision_pretrain": config.vision_pretrain.to_dict(),
            "seed": int(config.seed), "init_from": str(config.init_from), "train": train}


def skip_reason(config, family: str) -> str:
    """Why a run of `config` (model family `family`) does not pre-train its tower ("off": not configured),
    or "" when it does."""
    if not config.vision_pretrain.steps:
        return "off"
    if not families.get(family).vision_tower:
        return f"model.family={family} has no vision tower"
    return "init_from is set" if config.init_from and not config.vision_pretrain.with_init_from else ""


def maybe_pretrain(model, config, mesh, log, cache_dir: str | pathlib.Path | None = None) -> dict[str, float] | None:
    """The phase when `vision_pretrain.steps` asks for it and the model needs it: a loaded tower
    (`init_from`) is already trained unless `vision_pretrain.with_init_from` says otherwise (a stage-0
    model: only its VQ trained), and Emu3 has no understanding encoder."""
    skip = skip_reason(config, family_of(model.cfg))
    if skip == "off":
        return None
    if skip:
        log.info(f"vision pre-training skipped: {skip}")
        return None
    return pretrain_vision(model, config, mesh, log, cache_dir)


def pretrain_vision(model, config, mesh, log, cache_dir: str | pathlib.Path | None = None) -> dict[str, float]:
    """Trains `model.vision_model` in place for `vision_pretrain.steps` steps (or restores it from
    `cache_dir` when that holds a tower trained under the same settings); returns the held-out
    tagging metrics (`exact_set`: share of held-out images whose identity set is predicted exactly;
    `tag_accuracy`: per-identity accuracy; `loss` against `blind_loss`, see `tagging_scores`)."""
    settings = _settings(model, config)
    cache = pathlib.Path(cache_dir) if cache_dir else None
    if cache is not None and (cache / "info.json").is_file():
        info = json.loads((cache / "info.json").read_text())
        if info["settings"] == json.loads(json.dumps(settings)):
            _load_tower(model, cache / "vision_model.safetensors")
            log.info(f"vision tower restored from {cache} (held-out exact identity set "
                     f"{info['scores']['exact_set']:.3f})")
            return info["scores"]
        log.info(f"{cache} was made under other settings: training the vision tower again")
    scores = _train(model, config, mesh, log)
    if cache is not None and jax.process_index() == 0:
        with atomic_directory(cache, overwrite=True) as tmp:
            save_file({k: np.asarray(v) for k, v in flat_params(model.vision_model).items()},
                      str(tmp / "vision_model.safetensors"))
            (tmp / "info.json").write_text(json.dumps({"settings": settings, "scores": scores}, indent=2))
    return scores


def _load_tower(model, path: pathlib.Path) -> None:
    saved = load_file(str(path))
    state = nnx.state(model.vision_model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    missing = sorted({".".join(map(str, k)) for k in flat} ^ set(saved))
    if missing:
        raise ValueError(f"{path} does not match model.vision: tensors {missing[:4]} differ; remove it to retrain")
    for key, var in flat.items():
        name = ".".join(map(str, key))
        if saved[name].shape != var.get_value().shape:
            raise ValueError(f"{path}: tensor {name} has shape {saved[name].shape}, model.vision expects "
                             f"{var.get_value().shape}; remove it to retrain")
        var.set_value(jnp.asarray(saved[name], var.get_value().dtype))


def _phase_config(config) -> ml_collections.ConfigDict:
    """The run's config as the shared step builder reads it for this phase: every parameter of the
    tower and the tagger trains (no LoRA), with `_optimizer_config`'s optimizer settings."""
    c = copy.deepcopy(config)
    with c.unlocked():
        c.train = _optimizer_config(config)
        c.train.trainable, c.train.frozen = (".*",), ()
        c.model.lora.rank = 0
    return c


def _tagging_loss(model: _Tagged, batch: dict, dense_weight: float = 1.0) -> tuple[jax.Array, dict]:
    """Identity-set sigmoid cross-entropy (summed over identities) + `dense_weight` x the per-patch
    identity cross-entropy (mean over patches)."""
    tag_logits, patch_logits = model(_pixels(batch["image"]))
    tagging = optax.sigmoid_binary_cross_entropy(tag_logits, batch["tags"]).sum(-1).mean()
    dense = optax.softmax_cross_entropy_with_integer_labels(patch_logits, batch["patches"]).mean()
    loss = tagging + dense_weight * dense
    return loss, {"loss": loss, "tagging": tagging, "dense": dense}


def _train(model, config, mesh, log) -> dict[str, float]:
    """The phase, on the sharded, jitted train step every stage uses (`unijax.training.setup`)."""
    v = config.vision_pretrain
    steps = int(v.steps)
    image_size = model.cfg.vision.image_size
    sharding.check_batch("vision_pretrain.batch_size", v.batch_size, mesh)
    per_process = v.batch_size // jax.process_count()
    patch = model.cfg.vision.patch_size
    train_ds = (grain.MapDataset.source(TagSource(config.seed, image_size, patch))[jax.process_index()::jax.process_count()]
                .batch(per_process, drop_remainder=True)
                .to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))
    held_out = grain.MapDataset.source(TagSource(config.seed + EVAL_SEED_OFFSET, image_size, patch))
    held_out = held_out.batch(int(v.eval_images))[0]

    phase = _phase_config(config)
    tagged = _Tagged(model.vision_model, model.cfg.vision.hidden_size, rngs=nnx.Rngs(config.seed + 1))
    built = train_setup.build(tagged, phase, mesh)
    loss_fn = functools.partial(_tagging_loss, dense_weight=float(v.dense_weight))
    step = train_setup.jit_train_step(built, phase, mesh, loss_fn, batch_keys=("image", "tags", "patches"))
    state, frozen, graphdef = built.state, built.frozen, built.graphdef
    predict = jax.jit(lambda p, f, images: nnx.merge(graphdef, p, f)(_pixels(images)))

    log.info(f"vision pre-training: {steps} steps x {v.batch_size} images, identity tagging "
             f"({len(shapes.IDENTITIES)} labels)")
    it = iter(train_ds)
    t0 = time.perf_counter()
    losses = []
    with jax.set_mesh(mesh):
        for i in range(1, steps + 1):
            state, metrics = step(state, frozen, sharding.put_batch(next(it), mesh))
            losses.append(metrics["loss"])
            if i % int(v.log_every) == 0 or i == steps:
                elapsed = time.perf_counter() - t0
                mean = float(np.mean(to_host(losses)))
                losses = []
                log.info(f"vision step {i}/{steps} loss={mean:.4f} elapsed={elapsed:.0f}s "
                         f"eta={elapsed / i * (steps - i):.0f}s")
                log.write(i, {"loss": mean}, prefix="vision_pretrain/")
        if hasattr(it, "close"):
            it.close()
        logits, patch_logits = to_host(predict(state["params"], frozen, held_out["image"]))
    scores = tagging_scores(np.asarray(logits, np.float64), held_out["tags"])
    scores["patch_accuracy"] = float((np.asarray(patch_logits).argmax(-1) == held_out["patches"]).mean())
    log.write(steps, scores, prefix="vision_pretrain/")
    log.info(f"vision pre-training done: held-out exact identity set {scores['exact_set']:.3f}, tag accuracy "
             f"{scores['tag_accuracy']:.4f}, patch identity accuracy {scores['patch_accuracy']:.3f}, loss "
             f"{scores['loss']:.3f} (image-blind {scores['blind_loss']:.3f}; "
             f"{v.eval_images} images)")
    trained = nnx.merge(graphdef, to_host(state["params"]), to_host(frozen))
    nnx.update(model.vision_model, nnx.state(trained.vision_model))  # the trained tower, back into `model`
    return scores
