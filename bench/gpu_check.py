"""A short, prepared check for a lent NVIDIA GPU (sized for one H100, under 8 minutes): cuDNN attention,
train-step speed and MFU, TA-MoE capacity vs dropless.

    bash bench/gpu_check.sh                              # on the GPU machine: installs, then runs this
    python bench/gpu_check.py                            # the check alone (jax[cuda12] already installed)
    JAX_PLATFORMS=cpu python bench/gpu_check.py --dry_run   # the same code path on CPU, tiny sizes
    JAX_PLATFORMS=cpu python bench/gpu_check.py --aot_h100  # part (a) compiled for an H100 without a GPU

Parts (each timed, each failure recorded in the JSON rather than ending the run):

(a) `cudnn`: the tiny preset with `model.dtype=bfloat16`, `model.attention_impl=auto`
    (`unijax.models.layers.resolve_attention_impl` -> `cudnn` on a GPU), its forward lowered and
    compiled from abstract parameters; the compiled HLO must hold a cuDNN fused-attention custom call
    (`__cudnn$fmha...`), whose names are printed. The same for the forward + backward of a raw
    `jax.nn.dot_product_attention(..., is_causal=True, implementation="cudnn")` on `[2, 1024, 8, 128]`
    bf16, then that kernel timed against `implementation="xla"`. On CPU (`--dry_run`) the assertion
    is skipped (printed), the xla kernel alone is timed.
(b) `train_step`: the dense language-modelling step of `bench/train_step.py`'s `100m` config (its
    `SIZES` and analytic `model_flops`), bf16 activations / f32 parameters, AdamW, one jitted step
    with donated state, `--warmup` then `--steps` timed steps, per `--attn_impls` (auto = cuDNN, xla):
    tokens/s at B=16 x T=1024, and MFU against `--peak_tflops` (H100 SXM dense bf16: 989) with the analytic FLOPs
    (XLA's cost analysis is recorded too; it does not count the cuDNN custom calls).
(c) `moe`: `bench/moe.py`'s dense / capacity / dropless forward + backward of one TA-MoE FFN layer
    (sizes `tiny` and `1b`, bf16), median ms and ratio to dense, where the time budget allows.

`--aot_h100` compiles part (a) on a CPU-only host for an H100 (compile-only devices from the CUDA
PJRT plugin's topology, `target_config` = the `GpuTargetConfigProto` below); it needs
`jax-cuda12-plugin`/`jax-cuda12-pjrt` 0.10.2 and `nvidia-cudnn-cu12` (jax asks the local cuDNN its
version at trace time) in the environment, and `JAX_PLATFORMS=cpu` (docs/gpu.md).

Results: printed, and JSON to `$OUT/gpu_check.json` when `$OUT` is set, else `--json`
(default bench/results/gpu_check.json). Exit status 1 when the cuDNN assertion fails on a GPU.
"""

from __future__ import annotations

import os
import pathlib
import sys

_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
os.environ["XLA_FLAGS"] = " ".join(_flags)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

H100_PEAK_TFLOPS = 989.0  # H100 SXM, dense bf16 tensor cores

_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')


def custom_calls(hlo_text: str) -> list[str]:
    return sorted(set(_CUSTOM_CALL.findall(hlo_text)))


def cudnn_fmha_calls(hlo_text: str) -> list[str]:
    return [c for c in custom_calls(hlo_text) if c.startswith("__cudnn$fmha")]


def on_gpu(platform: str) -> bool:
    return platform in ("gpu", "cuda")


def cost_flops(compiled) -> float:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 (some backends do not implement it)
        return 0.0
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def timed(fn, args, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


# -- (a) cuDNN attention -----------------------------------------------------------------------------
def tiny_config(dtype: str, attention_impl: str):
    from unijax.models.family import preset

    return preset("tiny", dtype=dtype, param_dtype="float32", attention_impl=attention_impl)


def abstract_forward(cfg, batch: int, seq: int, mesh=None):
    """The Janus forward (text logits) for `cfg`, lowered from abstract parameters (nothing allocated);
    with `mesh` (compile-only devices), every input replicated over it and traced under it."""
    from unijax.models.janus import Janus

    abstract = nnx.eval_shape(lambda: Janus(cfg, rngs=nnx.Rngs(0)))  # outside the mesh, as checkpoints.abstract_model
    graphdef, state = nnx.split(abstract)
    sharding = replicated(mesh)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)

    def forward(state, tokens, positions, segment_ids):
        m = nnx.merge(graphdef, state)
        h, _ = m(tokens, jnp.zeros_like(tokens), positions, segment_ids)
        return m.text_logits(h)

    ints = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sharding)
    with mesh_context(mesh):
        return jax.jit(forward).lower(state, ints, ints, ints)


def replicated(mesh):
    return None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def mesh_context(mesh):
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def raw_attention(impl: str):
    def attn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

    def loss(q, k, v):
        return attn(q, k, v).astype(jnp.float32).sum()

    return jax.jit(attn), jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def check_cudnn(args, platform: str, mesh=None) -> dict:
    from unijax.models.layers import resolve_attention_impl

    out: dict = {"platform": platform}
    cfg = tiny_config("bfloat16", "auto")
    with mesh_context(mesh):  # resolved at trace time, on the target's platform
        out["resolved_attention_impl"] = resolve_attention_impl(cfg.attention_impl)
    print(f"[cudnn] model.attention_impl=auto resolves to {out['resolved_attention_impl']!r} on {platform}")
    batch, seq = (2, 64) if args.dry_run else (2, 256)
    t0 = time.perf_counter()
    compiled = abstract_forward(cfg, batch, seq, mesh).compile()
    text = compiled.as_text()
    out["model_forward"] = {"batch": batch, "seq": seq, "compile_s": time.perf_counter() - t0,
                            "cudnn_fmha_calls": cudnn_fmha_calls(text), "custom_calls": custom_calls(text)}
    with contextlib.suppress(Exception):
        out["model_forward"]["memory_analysis"] = str(compiled.memory_analysis())
    print(f"[cudnn] tiny Janus forward (bf16, B={batch}, T={seq}): cuDNN fMHA calls "
          f"{out['model_forward']['cudnn_fmha_calls']} (custom calls: {out['model_forward']['custom_calls']})")

    shape = (2, 128, 4, 64) if args.dry_run else (2, 1024, 8, 128)
    qkv = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=replicated(mesh))] * 3
    impls = ("cudnn", "xla") if on_gpu(platform) else ("xla",)
    out["raw_attention"] = {"shape": list(shape)}
    for impl in impls:
        fwd, grad = raw_attention(impl)
        row = {}
        for name, fn in (("fwd", fwd), ("fwd_bwd", grad)):
            with mesh_context(mesh):
                c = fn.lower(*qkv).compile()
            row[f"{name}_cudnn_fmha_calls"] = cudnn_fmha_calls(c.as_text())
        out["raw_attention"][impl] = row
        print(f"[cudnn] jax.nn.dot_product_attention(implementation={impl!r}) {shape} bf16: "
              f"fwd {row['fwd_cudnn_fmha_calls']}, fwd+bwd {row['fwd_bwd_cudnn_fmha_calls']}")

    if mesh is None:  # a real device: time the raw kernel, cuDNN against XLA
        big = (2, 256, 4, 64) if args.dry_run else (4, 4096, 16, 128)
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(kk, big, jnp.bfloat16) for kk in keys)
        flops = 4 * big[0] * big[2] * big[1] * big[1] * big[3] / 2 * 3.5  # causal fwd (2 matmuls) + bwd (5): 3.5x fwd
        for impl in impls:
            _, grad = raw_attention(impl)
            ms = 1e3 * statistics.median(timed(grad, (q, k, v), 2, args.attn_steps))
            out["raw_attention"][impl].update(timed_shape=list(big), fwd_bwd_ms=ms,
                                              tflops=flops / (ms / 1e3) / 1e12)
            print(f"[cudnn] fwd+bwd {impl:5s} {big} causal bf16: {ms:8.2f} ms  ({flops / (ms / 1e3) / 1e12:6.1f} TFLOP/s)")

    found = out["model_forward"]["cudnn_fmha_calls"]
    if on_gpu(platform):
        out["assert"] = "passed" if found else "FAILED"
        if not found:
            print("[cudnn] ASSERTION FAILED: no __cudnn$fmha custom call in the compiled model forward")
        else:
            print(f"[cudnn] assertion passed: {found}")
    else:
        out["assert"] = f"skipped (platform is {platform})"
        print(f"[cudnn] cuDNN assertion skipped: the platform is {platform}")
    return out


# -- (b) train step ----------------------------------------------------------------------------------
def check_train_step(args, platform: str, deadline: float) -> dict:
    from bench.train_step import SIZES, matmul_params, model_flops

    size = "tiny" if args.dry_run else args.size
    c = SIZES[size]
    batch, seq = (2, 64) if args.dry_run else (args.batch, args.seq)
    warmup, steps = (1, 2) if args.dry_run else (args.warmup, args.steps)
    dtype = "bfloat16"
    flops = model_flops(c, "dense", batch * seq, seq, batch)
    out = {"size": size, "batch": batch, "seq": seq, "dtype": dtype, "model_flops_per_step": flops,
           "matmul_params": sum(matmul_params(c).values()), "peak_tflops": args.peak_tflops, "runs": []}
    print(f"\n[train_step] {size} ({out['matmul_params'] / 1e6:.0f}M matmul params), B={batch} x T={seq}, {dtype}, "
          f"{flops / 1e12:.2f} model TFLOP/step")
    for impl in args.attn_impls.split(","):
        if time.monotonic() > deadline:
            out["runs"].append({"attention_impl": impl, "skipped": "time budget"})
            print(f"[train_step] attention_impl={impl}: skipped (time budget)")
            continue
        try:
            out["runs"].append(train_run(c, batch, seq, dtype, impl, warmup, steps, flops, args.peak_tflops))
        except Exception as e:  # noqa: BLE001 (an OOM in one run keeps the others)
            out["runs"].append({"attention_impl": impl, "error": f"{type(e).__name__}: {str(e)[:1000]}"})
            print(f"[train_step] attention_impl={impl}: ERROR {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    return out


def train_run(c: dict, batch: int, seq: int, dtype: str, impl: str, warmup: int, steps: int, flops: float,
              peak_tflops: float) -> dict:
    """One `model.attention_impl` run of the train step (`bench/train_step.py`'s dense step): compile,
    warm up, time."""
    from bench.train_step import build_unijax

    t0 = time.perf_counter()
    step, state, frozen, tokens = build_unijax(c, "dense", batch, seq, dtype, impl)
    compiled = step.lower(state, frozen, tokens).compile()
    compile_s = time.perf_counter() - t0
    xla_flops = cost_flops(compiled)
    text = compiled.as_text()
    times, losses = [], []
    for i in range(warmup + steps):
        t1 = time.perf_counter()
        state, loss = compiled(state, frozen, tokens)
        loss.block_until_ready()
        if i >= warmup:
            times.append(time.perf_counter() - t1)
            losses.append(float(loss))
    sec = statistics.median(times)
    row = {"attention_impl": impl, "compile_s": compile_s, "step_s_median": sec, "step_s_all": times,
           "tokens_per_s": batch * seq / sec, "model_tflops_per_s": flops / sec / 1e12,
           "mfu": flops / sec / (peak_tflops * 1e12), "xla_cost_flops": xla_flops,
           "xla_cost_mfu": xla_flops / sec / (peak_tflops * 1e12) if xla_flops else None,
           "cudnn_fmha_calls": cudnn_fmha_calls(text), "loss_first_last": [losses[0], losses[-1]]}
    print(f"[train_step] attention_impl={impl:4s}: {1e3 * sec:8.2f} ms/step, {row['tokens_per_s']:,.0f} tokens/s, "
          f"{row['model_tflops_per_s']:.1f} TFLOP/s, MFU {100 * row['mfu']:.1f}% of {peak_tflops:.0f} "
          f"(XLA cost {xla_flops / 1e12:.2f} TFLOP/step), compile {compile_s:.1f} s, "
          f"cuDNN calls {row['cudnn_fmha_calls']}, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return row


# -- (c) TA-MoE --------------------------------------------------------------------------------------
def check_moe(args, platform: str, deadline: float) -> dict:
    from bench import moe

    sizes = ("tiny",) if args.dry_run else tuple(args.moe_sizes.split(","))
    dtype = "float32" if args.dry_run else "bfloat16"
    repeats = 1 if args.dry_run else args.moe_repeats
    out = {"dtype": dtype, "rows": []}
    print(f"\n[moe] one TA-MoE FFN layer fwd+bwd, {dtype}, median of {repeats}")
    for size_name in sizes:
        res = {}
        for name in ("dense",) + moe.IMPLS:
            if time.monotonic() > deadline:
                print(f"[moe] {size_name} {name}: skipped (time budget)")
                continue
            res[name] = moe.time_variant(name, moe.SIZES[size_name], repeats, dtype)
            print(f"[moe] {size_name:5s} {name:9s} {res[name]['ms']:9.2f} ms", flush=True)
        for r in res.values():
            r.update(size=size_name, ratio_to_dense=r["ms"] / res["dense"]["ms"] if "dense" in res else None)
            out["rows"].append(r)
        done = [k for k in moe.IMPLS if k in res]
        if done and "dense" in res:
            best = min(done, key=lambda k: res[k]["ms"])
            out.setdefault("fastest", {})[size_name] = {"impl": best, "ratio_to_dense": res[best]["ratio_to_dense"]}
            print(f"[moe] {size_name}: fastest = {best}, {res[best]['ratio_to_dense']:.2f}x dense")
    return out


# -- main --------------------------------------------------------------------------------------------
def aot_h100_mesh():
    """unijax's mesh (`unijax.sharding.make_mesh`, every axis 1) over one H100 compile-only device
    from the CUDA PJRT plugin's topology (no GPU needed; see the module docstring)."""
    from unijax.sharding import make_mesh
    from unijax.training import gpu_targets

    devices = gpu_targets.devices("h100:1")
    print(f"[aot] compile-only devices: {devices} (platform {devices[0].platform})")
    return make_mesh({}, devices)


def run_part(name: str, results: dict, fn, *a):
    t0 = time.perf_counter()
    try:
        results[name] = fn(*a)
    except Exception as e:  # noqa: BLE001 (record and go on: the other parts still tell something)
        results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:2000],
                         "traceback": traceback.format_exc()[-4000:]}
        print(f"[{name}] ERROR {results[name]['error']}")
    results[name]["seconds"] = time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry_run", action="store_true", help="tiny sizes; on CPU the cuDNN assertion is skipped")
    ap.add_argument("--aot_h100", action="store_true", help="part (a) only, compiled for an H100 without a GPU")
    ap.add_argument("--parts", default="cudnn,train_step,moe")
    ap.add_argument("--size", default="100m", help="bench/train_step.py SIZES key")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--attn_impls", default="auto,xla", help="train-step runs: model.attention_impl values")
    ap.add_argument("--attn_steps", type=int, default=10)
    ap.add_argument("--moe_sizes", default="tiny,1b")
    ap.add_argument("--moe_repeats", type=int, default=5)
    ap.add_argument("--peak_tflops", type=float, default=H100_PEAK_TFLOPS)
    ap.add_argument("--budget_s", type=float, default=420.0, help="later runs are skipped past this (compile included)")
    ap.add_argument("--json", default=str(REPO_ROOT / "bench" / "results" / "gpu_check.json"))
    args = ap.parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    parts = args.parts.split(",")

    from bench.common import machine_meta, write_json

    platform = jax.default_backend()
    results: dict = {}
    if args.aot_h100:
        mesh = aot_h100_mesh()
        platform = mesh.devices.flat[0].platform
        run_part("cudnn", results, check_cudnn, args, platform, mesh)
        parts = []
        meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "backend": jax.default_backend(), "jax": jax.__version__,
                "target": "H100 (compile-only, --aot_h100)"}
    else:
        meta = machine_meta(dry_run=args.dry_run)
        print(f"backend {platform}: {jax.devices()}")
        if "cudnn" in parts:
            run_part("cudnn", results, check_cudnn, args, platform)
    if "train_step" in parts:
        run_part("train_step", results, check_train_step, args, platform, deadline)
    if "moe" in parts:
        run_part("moe", results, check_moe, args, platform, deadline)

    out = pathlib.Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else pathlib.Path(args.json)
    write_json(out, {"meta": meta, "args": vars(args), **results})
    failed = results.get("cudnn", {}).get("assert") == "FAILED" or "error" in results.get("cudnn", {})
    errors = [k for k, v in results.items() if "error" in v]
    print(f"\nparts: {', '.join(results)}; errors: {errors or 'none'}; cuDNN check: "
          f"{results.get('cudnn', {}).get('assert', results.get('cudnn', {}).get('error', 'not run'))}")
    return 1 if failed and on_gpu(platform) else 0


if __name__ == "__main__":
    sys.exit(main())
