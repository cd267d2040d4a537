"""Janus-Pro DPO on generation pairs (a prompt, a better and a worse image): align-anything's
`{"prompt", "better_image", "worse_image"}` records or TRL-style JSON Lines whose `chosen` /
`rejected` are image paths (docs/preference.md).

    python -m unijax.train --config configs/janus_pro/dpo_gen.py:7b \\
        --config.data.pref_jsonl=data/image_pairs.jsonl --config.data.pref_image_root=data/images

`:1b` / `:7b` pick the size; `+full` trains the decoder fully against a frozen copy (see dpo_und.py).
"""

from configs.janus_pro import common


def get_config(arg=None):
    return common.dpo(arg, "gen")
