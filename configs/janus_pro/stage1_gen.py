"""Janus-Pro stage 1 (generation): the decoder FFNs trained on your caption data with attention and
everything else frozen.

    python -m unijax.train --config configs/janus_pro/stage1_gen.py:7b \
        --config.data.t2i_jsonl=data/captions.jsonl --config.data.t2i_image_root=data/images
"""

from configs.janus_pro import common


def get_config(arg=None):
    return common.stage1(arg, "gen")
