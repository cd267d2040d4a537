"""Janus-Pro stage 1 (understanding): the decoder FFNs trained on your understanding data with
attention and everything else frozen (UniDecouple's task-specific FFNs).

    python -m unijax.train --config configs/janus_pro/stage1_und.py:7b \
        --config.data.mmu_json=data/llava.json --config.data.mmu_image_root=data/images
"""

from configs.janus_pro import common


def get_config(arg=None):
    return common.stage1(arg, "und")
