"""Stage 1 (generation): from a dense base checkpoint, train the decoder FFNs on text-to-image
data only, with self-attention and everything else frozen (UniDecouple's task-specific FFNs).

    python -m unijax.train --config configs/stage1_gen.py --config.init_from=workdir/base/model

Its `workdir/stage1_gen/model` becomes the T2I expert group when upcycling (configs/stage2.py).
"""

from configs import stage1_und


def get_config(arg=None):
    c = stage1_und.get_config(arg)
    c.workdir = "workdir/stage1_gen"
    c.data.gen_ratio, c.data.und_ratio = 1.0, 0.0   # generation (T2I) samples only
    return c
