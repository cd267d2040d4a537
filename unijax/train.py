"""The training CLI: `python -m unijax.train --config configs/<stage>.py [--config.key=value ...]`.

Runs or resumes (same command) the configured stage; see `unijax.training.loop.train`.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from unijax import cli, distributed
from unijax.analysis import recipe
from unijax.training.config import validate
from unijax.training.loop import NonFiniteLossError, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/base.py.",
                                          lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; config overrides look like --config.train.steps=10")

    distributed.maybe_initialize()  # multi-host / multi-process launches (unijax/distributed.py)

    config = _CONFIG.value
    try:
        if config.init_recipe and not config.init_from:  # build what the run starts from (cached in the workdir)
            validate(config)  # a typo stops the run before the prerequisites are built
            recipe.start_from_prerequisites(config)
        train(config)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    distributed.shutdown()


if __name__ == "__main__":
    cli.run(main)
