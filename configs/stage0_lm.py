"""Stage 0 (language): train the tiny decoder alone on the shapes world described in words, before it
ever sees an image: our stand-in for the pretrained LLM Janus-Pro starts from.

    python -m unijax.train --config configs/stage0_lm.py

Every understanding sample is a text-only chat: the first user turn describes the scene
("scene: a red circle, a blue square and two green triangles.", `data.scene_text`), then three
questions about it. Only the decoder and its text head train (no image encoder runs), so a step
costs a fraction of a joint one. The decoder learns the world's words and the comparisons its
questions need (is this identity among those, how many, which letter) from text, where they are
cheap; the base then only has to map images onto them (docs/shapes_testbed.md, "A language
stage"). `configs/base.py` builds it first (init_recipe), then stage 0's VQ on top of it.
"""

from configs import common


def get_config(arg=None):
    c = common.get_config(preset=arg or "tiny")
    c.workdir = "workdir/stage0_lm"
    c.data.scene_text = True
    c.data.gen_ratio = 0.0
    c.data.turns_per_image = 3
    c.data.max_len = 112               # three turns about a scene in words: at most 108 tokens
    c.data.packing = True              # rows average 68 tokens: several chats per row
    c.model.text.initializer_range = 0.088  # as configs/base.py (the decoder starts here)
    c.train.trainable = ("language_model/.*", "lm_head/.*")
    c.train.frozen = ()
    c.train.steps = 600
    c.train.batch_size = 32
    c.train.learning_rate = 2e-3
    c.train.warmup_steps = 60
    c.train.checkpoint_every = 300
    c.train.eval_every = 300
    c.train.eval_batches = 16
    return c
