import os

# 8 fake CPU devices for tiny meshes; must be set before JAX is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# grain worker processes read absl flags; outside `absl.app.run` they are never parsed.
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
