"""Stage 1 (understanding): from a dense base checkpoint, train the decoder FFNs on understanding
data only, with self-attention and everything else frozen (UniDecouple's task-specific FFNs).

    python -m unijax.train --config configs/stage1_und.py --config.init_from=workdir/base/model

Its `workdir/stage1_und/model` becomes the MMU expert group when upcycling (configs/stage2.py).
"""

from configs import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.workdir = "workdir/stage1_und"
    c.init_recipe = "base"            # without init_from: the base is built first (<workdir>/prerequisites)
    c.data.gen_ratio = 0.0            # understanding (MMU) samples only
    c.train.trainable = (r"language_model/layers/(.*/)?mlp/.*",)
    c.train.frozen = ()               # everything not named above is frozen: attention, norms, vision, VQ, heads
    c.train.steps = 150
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 15
    c.train.checkpoint_every = 150
    c.train.eval_every = 150
    return c
