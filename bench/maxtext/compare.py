"""MaxText's dense decoder train step at Janus-Pro-7B's LLM shapes, compiled for TPU v5p-128 on this CPU.

    bench/maxtext/.venv/bin/python bench/maxtext/compare.py                      # fsdp=64
    bench/maxtext/.venv/bin/python bench/maxtext/compare.py --mesh dp8_fsdp8     # data=8 x fsdp=8
    bench/maxtext/.venv/bin/python bench/maxtext/compare.py attention=dot_product   # extra MaxText overrides

Runs MaxText's own `train_compile.main` (same config parsing, mesh, shaped state, jit/lower/compile
as `python -m maxtext.trainers.pre_train.train_compile`), keeps the compiled object, and writes
`bench/results/maxtext_7b[_<mesh>].json`: compile wall time, `cost_analysis()`, `memory_analysis()`,
the HLO path (`compiled.as_text()`, default /tmp/maxtext_7b[_<mesh>].hlo) and unijax's roofline on
that HLO (`unijax/training/roofline.py` is stdlib-only, loaded by path: no unijax install in the
venv), the same cost model `python -m unijax.plan --topology` applies to unijax's own step. See
README.md for the venv.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU target comes from get_topology_desc, no TPU needed
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

REPO = pathlib.Path(__file__).resolve().parents[2]

# Janus-Pro-7B's language model (LLaMA-style, DeepSeek-LLM 7B shapes), text-only dense step.
JANUS_7B = dict(
    model_name="default", decoder_block="llama2", base_emb_dim=4096, base_num_query_heads=32,
    base_num_kv_heads=32, base_mlp_dim=11008, base_num_decoder_layers=30, head_dim=128, vocab_size=102400,
    mlp_activations='["silu","linear"]', normalization_layer_epsilon=1e-6, enable_dropout=False,
    per_device_batch_size=2, max_target_length=1024, dtype="bfloat16", remat_policy="full", scan_layers=True,
    dataset_type="synthetic", enable_checkpointing=False, compile_topology="v5p-128",
    compile_topology_num_slices=1, run_name="janus7b_compile", base_output_directory="/tmp/maxtext_out",
)
MESHES = {"fsdp64": dict(ici_fsdp_parallelism=64, ici_data_parallelism=1),
          "dp8_fsdp8": dict(ici_fsdp_parallelism=8, ici_data_parallelism=8, allow_split_physical_axes=True)}  # 8 != 4x4x4 subset


def _fmt(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mesh", choices=sorted(MESHES), default="fsdp64")
    ap.add_argument("--hlo", default="", help="where to write compiled.as_text() (default /tmp/maxtext_7b[_mesh].hlo)")
    ap.add_argument("--json", default="", help="default bench/results/maxtext_7b[_mesh].json")
    ap.add_argument("overrides", nargs="*", help="extra MaxText key=value overrides")
    args = ap.parse_args()
    suffix = "" if args.mesh == "fsdp64" else f"_{args.mesh}"
    hlo_path = pathlib.Path(args.hlo or f"/tmp/maxtext_7b{suffix}.hlo")
    json_path = pathlib.Path(args.json or REPO / "bench" / "results" / f"maxtext_7b{suffix}.json")

    import jax
    from maxtext.configs import pyconfig
    from maxtext.trainers.pre_train import train_compile

    overrides = {**JANUS_7B, **MESHES[args.mesh]}
    argv = ["train_compile.py", os.path.join(os.path.dirname(pyconfig.__file__), "base.yml")]
    argv += [f"{k}={_fmt(v)}" for k, v in overrides.items()] + list(args.overrides)

    captured = {}
    original = train_compile.jit_and_compile

    def timed_jit_and_compile(*a, **k):  # lower + compile of the train step, the object kept
        t0 = time.perf_counter()
        captured["compiled"] = original(*a, **k)
        captured["compile_s"] = time.perf_counter() - t0
        return captured["compiled"]

    train_compile.jit_and_compile = timed_jit_and_compile
    t0 = time.perf_counter()
    train_compile.main(argv)
    total_s = time.perf_counter() - t0
    compiled = captured["compiled"]

    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
    cost = {k: float(v) for k, v in cost.items() if k in ("flops", "transcendentals", "bytes accessed",
                                                          "optimal_seconds", "utilization")}
    mem = compiled.memory_analysis()
    mem = {k: int(getattr(mem, k)) for k in dir(mem) if k.endswith("_in_bytes")}
    mem["peak_estimate_in_bytes"] = (mem.get("argument_size_in_bytes", 0) + mem.get("output_size_in_bytes", 0)
                                     + mem.get("temp_size_in_bytes", 0) - mem.get("alias_size_in_bytes", 0))
    text = compiled.as_text()
    hlo_path.write_text(text)

    spec = importlib.util.spec_from_file_location("roofline", REPO / "unijax" / "training" / "roofline.py")
    roofline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roofline)
    roof = roofline.summary(roofline.analyse(text, "tpu_v5p", 64), "tpu_v5p", cost)

    from importlib.metadata import version

    import maxtext
    result = dict(
        mesh=args.mesh, topology="v5p-128 (v5p:4x4x4, 64 chips)", overrides=argv[2:],
        versions={p: version(p) for p in ("maxtext", "jax", "jaxlib", "libtpu", "flax")},
        compile_seconds=captured["compile_s"], total_seconds=total_s, cost_analysis=cost,
        memory_analysis=mem, hlo_path=str(hlo_path), hlo_chars=len(text), unijax_roofline=roof,
    )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "overrides"}, indent=1, default=str))
    print(f"wrote {json_path} and {hlo_path}; maxtext at {os.path.dirname(maxtext.__file__)}, jax {jax.__version__}")


if __name__ == "__main__":
    main()
