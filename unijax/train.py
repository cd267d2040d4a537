"""The training CLI: `python -m unijax.train --config configs/<stage>.py [--config.key=value ...]`.

Runs or resumes (same command) the configured stage; see `unijax.training.loop.train`.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from unijax import cli, distributed
from unijax.training.loop import NonFiniteLossError, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/base.py.",
                                          lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; config overrides look like --config.train.steps=10")
    if not flags.FLAGS["verbosity"].present:  # keep the console to progress lines; --verbosity=0 shows Orbax's INFO logs
        logging.set_verbosity(logging.WARNING)

    distributed.maybe_initialize()  # multi-host / multi-process launches (unijax/distributed.py)

    try:
        train(_CONFIG.value)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    distributed.shutdown()


if __name__ == "__main__":
    cli.run(main)
