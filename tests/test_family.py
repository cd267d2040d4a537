"""The model-family protocol: a third family, defined and registered in this module only, trains,
generates and converts through the generic code (`unijax.models.family`)."""

import dataclasses

import envs
import jax
import numpy as np
import pytest
from flax import nnx

from configs import base
from unijax import checkpoints
from unijax.hf.convert import checkpoint_to_hf, hf_to_checkpoint
from unijax.inference import decode
from unijax.inference.engine import Engine
from unijax.models import family, presets
from unijax.models.config import JanusConfig
from unijax.models.family.janus import HF_RENAMES
from unijax.models.janus import Janus
from unijax.training import loop


@dataclasses.dataclass(frozen=True)
class ToyConfig(JanusConfig):
    """Janus's fields; transformers' side calls it `toy_janus`."""

    family = "toy"


class Toy(Janus):
    """The toy family's model: Janus's modules under another class."""


class ToyFamily(family.Family):
    name = "toy"
    config_cls = ToyConfig
    model_cls = Toy
    presets = {"tiny": presets.tiny}
    hf_model_types = ("toy_janus",)
    hf_renames = HF_RENAMES

    def config_from_hf(self, hf, generation, *, image_size=0, **runtime):
        janus = JanusConfig.from_hf({**hf, "model_type": "janus",
                                     "generation_kwargs": (generation or {}).get("generation_kwargs", {})}, **runtime)
        return ToyConfig(**{f.name: getattr(janus, f.name) for f in dataclasses.fields(janus)})

    def config_to_hf(self, cfg):
        return {**cfg.to_hf(), "model_type": "toy_janus"}

    def image_layout(self, cfg):  # understanding images are centre-cropped, not padded
        return dataclasses.replace(super().image_layout(cfg), und_rule="crop")

    def unconditional_keep(self, tokens, cfg):
        return tokens == cfg.boi_token_id


family.register(ToyFamily())


def test_registry_answers_by_name_config_and_model_type():
    fam = family.get("toy")
    cfg = family.preset("tiny", "toy")
    assert isinstance(cfg, ToyConfig) and family.of(cfg) is fam and family.for_hf_model_type("toy_janus") is fam
    assert family.config_from_dict(cfg.to_dict()) == cfg
    assert isinstance(family.build(cfg, nnx.Rngs(0)), Toy)
    with pytest.raises(ValueError, match=r"model.family='nope' is not one of \('janus', 'emu3', 'toy'\)"):
        family.get("nope")
    with pytest.raises(ValueError, match="already registered by ToyFamily"):
        family.register(type("Other", (family.Family,), {"name": "toy"})())


def test_third_family_trains_generates_and_converts(tmp_path):
    c = base.get_config()
    c.model.family = "toy"
    c.model.text.num_layers = 2
    c.workdir, c.data.dir = str(tmp_path / "run"), str(tmp_path / "data")
    c.data.update(envs.SHORT_ROWS)
    c.mesh.data = 1
    c.vision_pretrain.steps = c.adaptor_warmup.steps = 0
    c.train.update(steps=2, batch_size=4, log_every=1, checkpoint_every=2, eval_every=1000, eval_batches=1,
                   warmup_steps=1, async_checkpointing=False)
    metrics = loop.train(c, devices=jax.devices()[:1])
    assert np.isfinite(metrics["loss"])
    ckpt = tmp_path / "run" / "model"
    assert isinstance(checkpoints.read_config(ckpt), ToyConfig)

    engine = Engine.load(ckpt, batch_size=2)
    assert isinstance(engine.model, Toy) and engine.und_image.rule == "crop"
    answers = engine.answer([np.zeros((32, 32, 3), np.uint8)] * 2, ["what is here?"] * 2, max_new_tokens=3)
    assert len(answers) == 2
    images = engine.images(["a red circle"], num_images=1, seed=0)
    assert images.shape == (1, 1, 32, 32, 3)
    prompt = np.asarray([engine.tokenizer.t2i_ids("a red circle")])
    null = np.asarray(decode.unconditional_prompt(prompt, engine.cfg))  # the family's rule: BOS blanked too
    assert set(null[0]) == {engine.cfg.text.pad_token_id, engine.cfg.boi_token_id}

    hf_dir = tmp_path / "hf"
    checkpoint_to_hf(ckpt, hf_dir)
    assert '"model_type": "toy_janus"' in (hf_dir / "config.json").read_text()
    back = hf_to_checkpoint(hf_dir, tmp_path / "back")
    assert isinstance(back, ToyConfig)
    ours, theirs = (checkpoints.flat_params(checkpoints.load_model(p)) for p in (ckpt, tmp_path / "back"))
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_array_equal(np.asarray(ours[k]), np.asarray(theirs[k]), err_msg=k)
