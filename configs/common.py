"""The training config every stage starts from (`configs/base.py`, `configs/stage0_vq.py`, ...):
every key with its default and type, defined in `unijax.training.config.defaults`.

    python -m unijax.train --config configs/common.py     # the defaults alone (1000 joint dense steps)
"""

from unijax.training.config import defaults


def get_config(preset: str = "tiny"):
    return defaults(preset or "tiny")
