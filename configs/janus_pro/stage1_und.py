"""Janus-Pro stage 1 (understanding): the decoder FFNs trained on your understanding data with
attention and everything else frozen (UniDecouple's task-specific FFNs).

    python -m unijax.train --config configs/janus_pro/stage1_und.py:7b \
        --config.data.mmu_json=data/llava.json --config.data.mmu_image_root=data/images
"""

from configs.janus_pro import common


def get_config(arg=None):
    size, _ = common.parse(arg)
    c = common.recipe(size, "stage1_und")
    c.data.gen_ratio = 0.0
    c.train.trainable = (r"language_model/layers/(.*/)?mlp/.*",)
    c.train.frozen = ()               # everything not trainable is frozen
    return c
