"""Compile-only GPU checks, run by `tests/test_gpu_plan.py` in the side environment that holds jax's
CUDA plugin (`launch/gpu_plan_env.sh`); not a test module of its own (the repo's environment has no
plugin). Prints one JSON object: per check, what the roofline counted and what the math says.

    JAX_PLATFORMS=cpu .venv-gpu-plan/bin/python tests/gpu_checks.py
"""

import json
import pathlib
import re
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from configs import stage2  # noqa: E402
from unijax import plan as planner  # noqa: E402
from unijax.training import roofline  # noqa: E402


def counted(f, *args, n=1, per_host=0, options=None):
    text = jax.jit(f).lower(*args).compile(compiler_options=options).as_text()
    cost = roofline.analyse(text, "h100", n, per_host)
    return roofline.summary(cost, "h100"), sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))


def spec(mesh, shape, *axes, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*axes)))


def main() -> None:
    out = {}
    one = Mesh(np.asarray(planner.topology_devices("h100:1")), ("x",))
    m, k, n = 1024, 2048, 512
    c, calls = counted(jax.grad(lambda x, w: jnp.sum(jnp.tanh(x @ w).astype(jnp.float32)), argnums=(0, 1)),
                       spec(one, (m, k)), spec(one, (k, n)))
    out["matmul"] = {"flops": c["flops_per_device"], "want": 3 * 2 * m * k * n, "calls": calls,
                     "unknown": c["custom_calls_of_unknown_cost"]}
    c, calls = counted(jax.grad(lambda x, w: jnp.sum(jnp.tanh(x @ w).astype(jnp.float32)), argnums=(0, 1)),
                       spec(one, (m, k)), spec(one, (k, n)), options={"xla_gpu_enable_triton_gemm": False})
    out["matmul_cublas"] = {"flops": c["flops_per_device"], "want": 3 * 2 * m * k * n, "calls": calls,
                            "unknown": c["custom_calls_of_unknown_cost"]}

    b, t, h, d = 2, 1024, 8, 128

    def attention(q, k_, v):
        y = jax.nn.dot_product_attention(q, k_, v, is_causal=True, implementation="cudnn")
        return jnp.sum(y.astype(jnp.float32))

    qkv = [spec(one, (b, t, h, d)) for _ in range(3)]
    c, calls = counted(jax.grad(attention, argnums=(0, 1, 2)), *qkv)
    out["attention"] = {"flops": c["flops_per_device"], "want": (2 + 5) * 2 * b * h * t * t * d * 0.5,
                        "calls": calls, "unknown": c["custom_calls_of_unknown_cost"]}

    nb, hw, ci, co = 4, 32, 64, 128

    def conv(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.tanh(y).astype(jnp.float32))  # tanh: the backward needs the forward

    c, calls = counted(jax.grad(conv, argnums=(0, 1)), spec(one, (nb, hw, hw, ci)), spec(one, (3, 3, ci, co)))
    taps = (3 * hw - 2) ** 2  # (output, tap) pairs that land inside the unpadded 32 x 32 input
    out["conv"] = {"flops": c["flops_per_device"], "want": 3 * 2 * nb * ci * co * taps, "calls": calls,
                   "unknown": c["custom_calls_of_unknown_cost"]}

    two_hosts = Mesh(np.asarray(planner.topology_devices("h100:2x4")).reshape(2, 4), ("host", "gpu"))
    rows, width = 4096, 1024
    gather = {}
    for name, axes in (("across_hosts", ("host", "gpu")), ("within_a_host", ("gpu",))):
        def f(x):
            return jax.lax.with_sharding_constraint(x, NamedSharding(two_hosts, P())) * 2
        c, _ = counted(f, spec(two_hosts, (rows, width), axes, dtype=jnp.float32), n=8, per_host=4)
        gather[name] = {"bytes": c["collective_bytes_per_device"],
                        "between_hosts": c["collective_bytes_between_hosts_per_device"],
                        "seconds": c["collective_seconds"]}
    out["all_gather"] = gather | {"size": rows * width * 4}

    c = stage2.get_config("aia")
    c.model.scan_layers, c.model.remat_policy = True, "full"
    c.model.text.num_layers = 2
    c.model.dtype, c.train.batch_size, c.train.frozen_dtype = "bfloat16", 8, "bfloat16"
    with tempfile.TemporaryDirectory() as tmp:
        r = planner.plan(c, dict(data=2, fsdp=2, expert=2), topology="h100:2x4", hlo_path=f"{tmp}/step.hlo")
        text = pathlib.Path(f"{tmp}/step.hlo").read_text()
    out["plan"] = {k: r[k] for k in ("chip", "devices", "fits", "peak_bytes_per_device", "optimal_seconds",
                                     "estimated_mfu", "useful_over_compiled", "collective_bytes_per_device")}
    out["plan"]["compiled_cost"] = {k: v for k, v in r["compiled_cost"].items() if k != "top_sources"}
    out["plan"]["calls"] = sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
