"""The XLA settings of the test suite, for this process (conftest.py) and the CLI subprocesses tests start.

Tests run tiny programs a few times each, so XLA's compile time, not run time, is most of the
suite: `--xla_backend_optimization_level=0` skips the backend's (LLVM) optimisation passes, which
took the fast suite from 938 s to 611 s on a 2-core CPU. Runs outside the tests keep XLA's defaults.

`SHORT_ROWS` is the data layout of the tests' tiny training runs: one question per image in 112
slots, where `configs/base.py` asks three in 160 (shorter rows compile and run faster).
"""

import os

COMPILE_FAST = "--xla_backend_optimization_level=0"
SHORT_ROWS = {"turns_per_image": 1, "max_len": 112}  # `data.*` keys
SHORT_ROWS_FLAGS = [f"--config.data.{k}={v}" for k, v in SHORT_ROWS.items()]


def xla_flags(devices: int | None = None) -> str:
    """The suite's XLA flags, with `devices` fake CPU devices (None: JAX's default, one)."""
    return COMPILE_FAST + ("" if devices is None else f" --xla_force_host_platform_device_count={devices}")


def cli_env(devices: int | None = None, **extra) -> dict:
    """os.environ for a CLI subprocess: CPU, `devices` fake devices, the suite's XLA flags, `extra`."""
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices), **extra)
