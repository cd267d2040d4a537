"""TA-MoE FFN vs a dense SwiGLU FFN with the same active parameters: forward + backward step time.

    python bench/moe.py                               # tiny and 1b, 3 timed repeats each
    python bench/moe.py --sizes tiny --repeats 1      # quick smoke run

The TA-MoE layer is the default one (`moe.*` of configs/common.py): 4 experts per task group,
top-2 inside the group, 1 shared expert, label group assignment, every expert `mlp` wide. A
token activates top_k + shared = 3 experts, so the dense baseline is one SwiGLU of inner width
`3 x mlp` (same active parameters, same matmul FLOPs per token). Half the tokens are
understanding (MMU), half generation (T2I), 5 % padding, like a Gen:Und 1:1 batch.

Timed: one jitted `value_and_grad` of `sum(y * cotangent) + 0.01 * balance + 0.001 * z` with
respect to every parameter and the input (what a training step spends in the FFN), for

- `dense`:     the SwiGLU baseline,
- `capacity`:  TA-MoE, GShard capacity dispatch (capacity factor 1.25, gathers into
               `[experts, capacity, embed]` buffers, batched matmuls),
- `dropless`:  TA-MoE, tokens sorted by expert and `jax.lax.ragged_dot` grouped matmuls.

Each variant is compiled and run once, then timed `--repeats` times; the median is reported with
the ratio to dense. Sizes: `tiny` (the tiny preset: embed 128, mlp 344; 32 x 112 = 3584 tokens,
a configs/base.py batch) and `1b` (embed 2048, mlp 5632, 4096 tokens; on CPU `dropless` is timed
by its first call alone, compilation included (about a second, against minutes of ragged_dot,
which runs many times slower than a dense matmul on CPU), unless `--dropless_repeats_1b`).

Target (issue 4): TA-MoE at most 1.5x dense with the faster implementation. The script prints
which implementation is faster on this backend (what `moe.impl = "auto"` should pick there).
Results are printed as a Markdown table and written to `--json` (default bench/results/moe.json).
"""

from __future__ import annotations

import os
import pathlib
import sys

# JAX on the real CPU cores: drop any forced fake-device count (tests/conftest.py sets 8 for meshes).
_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
os.environ["XLA_FLAGS"] = " ".join(_flags)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import machine_meta, write_json  # noqa: E402
from unijax.models.config import MoEConfig  # noqa: E402
from unijax.models.family import preset
from unijax.models.layers import SwiGLU  # noqa: E402
from unijax.models.moe import TAMoE  # noqa: E402

SIZES = {"tiny": dict(embed=128, mlp=344, tokens=3584, seq=112),
         "1b": dict(embed=2048, mlp=5632, tokens=4096, seq=1024)}
TARGET = 1.5
IMPLS = ("capacity", "dropless")


def moe_config(size: dict, impl: str, dtype: str):
    text = dataclasses.replace(preset("tiny").text, hidden_size=size["embed"], intermediate_size=size["mlp"])
    return preset("tiny").replace(text=text, ffn="ta_moe", dtype=dtype, param_dtype="float32",
                                  moe=MoEConfig(impl=impl))


def batch(size: dict, dtype, seed: int = 0):
    b, t = size["tokens"] // size["seq"], size["seq"]
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, t, size["embed"]), np.float32), dtype)
    ct = jnp.asarray(rng.standard_normal((b, t, size["embed"]), np.float32), dtype)
    task = jnp.asarray((np.arange(b) % 2)[:, None].repeat(t, 1), jnp.int32)     # rows alternate MMU / T2I
    valid = jnp.asarray(np.arange(t)[None, :].repeat(b, 0) < int(t * 0.95))     # 5 % padding at row ends
    return x, ct, task, valid


def step_fn(module: nnx.Module, moe: bool):
    graphdef, params = nnx.split(module)

    def loss(params, x, ct, task, valid):
        m = nnx.merge(graphdef, params)
        if moe:
            y, aux = m(x, task, valid)
            return jnp.sum((y * ct).astype(jnp.float32)) + 0.01 * aux["balance"] + 0.001 * aux["z"]
        return jnp.sum((m(x) * ct).astype(jnp.float32))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def time_variant(name: str, size: dict, repeats: int, dtype: str) -> dict:
    dt = jnp.dtype(dtype)
    rngs = nnx.Rngs(0)
    if name == "dense":
        module = SwiGLU(size["embed"], 3 * size["mlp"], rngs=rngs, dtype=dt)
    else:
        module = TAMoE(moe_config(size, name, dtype), rngs=rngs)
    f, params = step_fn(module, name != "dense")
    args = batch(size, dt)
    t0 = time.perf_counter()
    jax.block_until_ready(f(params, *args))
    first = time.perf_counter() - t0
    if repeats == 0:  # the first call alone (compile included): for variants too slow to repeat
        return {"variant": name, "ms": 1e3 * first, "first_call_s": first, "repeats": 0,
                "params": sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(params, *args))
        times.append(time.perf_counter() - t0)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    return {"variant": name, "ms": 1e3 * statistics.median(times), "first_call_s": first, "repeats": repeats,
            "params": n_params}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="tiny,1b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dropless_repeats_1b", type=int, default=0,
                    help="timed repeats of dropless at 1b on CPU; 0 = its first call (compile included)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=str(REPO_ROOT / "bench" / "results" / "moe.json"))
    args = ap.parse_args(argv)

    backend = jax.default_backend()
    rows = []
    for size_name in args.sizes.split(","):
        size = SIZES[size_name]
        res = {}
        for name in ("dense",) + IMPLS:
            reps = args.dropless_repeats_1b if (size_name == "1b" and name == "dropless" and backend == "cpu") \
                else args.repeats
            res[name] = time_variant(name, size, reps, args.dtype)
            print(f"  {size_name:5s} {name:9s} {res[name]['ms']:10.1f} ms", flush=True)
        best = min(IMPLS, key=lambda k: res[k]["ms"])
        for name, r in res.items():
            r.update(size=size_name, tokens=size["tokens"], embed=size["embed"], mlp=size["mlp"],
                     ratio_to_dense=r["ms"] / res["dense"]["ms"], fastest_moe=(name == best))
            rows.append(r)

    print(f"\nbackend: {backend} ({jax.devices()[0].device_kind}), dtype {args.dtype}, "
          f"fwd+bwd of one FFN layer, median of the timed repeats\n")
    print("| size | tokens | variant | ms | x dense | params |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mark = " (fastest)" if r["fastest_moe"] else ""
        print(f"| {r['size']} | {r['tokens']} | {r['variant']}{mark} | {r['ms']:.1f} | {r['ratio_to_dense']:.2f} "
              f"| {r['params'] / 1e6:.2f}M |")
    summary = {}
    for size_name in args.sizes.split(","):
        best = next(r for r in rows if r["size"] == size_name and r["fastest_moe"])
        summary[size_name] = {"fastest_impl": best["variant"], "ratio_to_dense": best["ratio_to_dense"],
                              "meets_target": best["ratio_to_dense"] <= TARGET}
        print(f"\n{size_name}: fastest TA-MoE impl on {backend} = {best['variant']}, "
              f"{best['ratio_to_dense']:.2f}x dense (target <= {TARGET}x: "
              f"{'met' if best['ratio_to_dense'] <= TARGET else 'NOT met'})")
    write_json(args.json, {"meta": machine_meta(dtype=args.dtype, target_ratio=TARGET), "rows": rows,
                           "summary": summary})


if __name__ == "__main__":
    main()
