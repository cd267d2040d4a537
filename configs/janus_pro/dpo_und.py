"""Janus-Pro DPO on understanding pairs (an image, a question, a better and a worse answer):
align-anything's `Janus_TI2T` / `AA_TI2T` files or TRL-style JSON Lines (docs/preference.md).

    python -m unijax.train --config configs/janus_pro/dpo_und.py:7b \\
        --config.data.pref_jsonl=data/pairs.jsonl --config.data.pref_image_root=data/images

`:1b` / `:7b` pick the size. By default LoRA rank 16 adapts the decoder and the adapters alone train,
so the reference is the same network with the adapters off (no second copy); `:7b+full` trains the
decoder fully against a frozen bf16 copy of its starting weights, sharded like them (`plan` counts
it as `reference_params`).
"""

from configs.janus_pro import common


def get_config(arg=None):
    return common.dpo(arg, "und")
