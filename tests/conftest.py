import os

import envs

# 8 fake CPU devices for tiny meshes, and the suite's compile settings (tests/envs.py); must be set
# before JAX is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + envs.xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test session, shared with the CLI subprocesses the tests start:
# many tests compile the same tiny-model programs (a fresh jit closure per run misses the in-memory
# cache, the HLO-keyed disk cache does not). Fresh per session, so nothing carries over between runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="unijax_test_jax_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# grain worker processes read absl flags; outside `absl.app.run` they are never parsed.
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


def pytest_collection_modifyitems(config, items):
    """Tests marked `longest` run first (stable order otherwise): with `--dist worksteal`, one
    worker starts on the longest slow test while the other works through the rest, instead of
    the longest test starting last and running alone."""
    items.sort(key=lambda item: item.get_closest_marker("longest") is None)
