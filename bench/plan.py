"""The Janus-Pro recipes compiled for 64-chip TPU slices by the real TPU compiler (or 64 H100s by the
GPU compiler, compile-only): one table.

    python bench/plan.py                                     # 1B / 7B x stage 1 und / gen / stage 2 + AIA, v5p-64 and v6e-64
    python bench/plan.py --sizes 7b --stages stage2:aia --topologies v5p:4x4x4
    python bench/plan.py --topologies h100:8x8                # 8 hosts x 8 H100s, GPU compiler (launch/gpu_plan_env.sh)
    python bench/plan.py --fake_devices --chip h100           # the fit table on 64 fake CPU devices (no libtpu)

Each plan runs `python -m unijax.plan --config configs/janus_pro/<stage>.py:<size> --topology T` in its
own process with the recipe's own settings (bf16 compute, float32 trainable parameters and AdamW,
bf16 frozen weights, scanned layers, the recipe's remat, splash attention and megablox on TPU (cuDNN
attention on GPU), dropless MoE,
128 rows x 1024 tokens) and the recipe's mesh on 64 devices (stage 1: data=8 x fsdp=8; stage 2:
data=8 x expert=8). Prints a Markdown table and writes bench/results/plan.json; a plan that fails
is a row with its error.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench.common import machine_meta, write_json  # noqa: E402
from unijax.training import gpu_targets, roofline  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
MESHES = {"stage1_und": "data=8,fsdp=8", "stage1_gen": "data=8,fsdp=8", "stage2": "data=8,expert=8"}


def python_for(topology: str | None) -> str:
    """This python for a TPU topology; for a GPU one (`h100:8x8`), the side environment with jax's
    CUDA plugin (`launch/gpu_plan_env.sh`, built on first use)."""
    if not topology or roofline.chip_of_topology(topology) not in gpu_targets.TARGET_CONFIGS:
        return sys.executable
    out = subprocess.run(["bash", "launch/gpu_plan_env.sh"], cwd=REPO, capture_output=True, text=True, check=True)
    return str(REPO / out.stdout.strip())


def run_one(size: str, stage: str, topology: str, args) -> dict:
    name, _, variant = stage.partition(":")
    arg = size + (f"+{variant}" if variant else "")
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "plan.json"
        cmd = [python_for(topology), "-m", "unijax.plan", "--config", f"configs/janus_pro/{name}.py:{arg}",
               f"--mesh={args.mesh or MESHES[name]}", f"--json={out}", *args.extra]
        cmd += [f"--chip={args.chip}"] if args.fake_devices else [f"--topology={topology}"]
        print("$", " ".join(["python"] + cmd[1:-1 - len(args.extra)] + args.extra), flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
        row = {"size": size, "stage": stage, "topology": None if args.fake_devices else topology,
               "wall_s": round(time.time() - t0, 1)}
        if proc.returncode:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:]
            print(f"FAILED: {tail}", flush=True)
            return dict(row, error=" ".join(tail))
        print("\n".join(line for line in proc.stdout.splitlines() if not line.startswith("wrote")), flush=True)
        return dict(json.loads(out.read_text()), **row)


def table(rows: list[dict]) -> str:
    lines = ["| model | stage | chips | mesh | peak / device (HBM) | collectives / device | step (roofline) | "
             "useful PFLOP | useful / compiled | estimated MFU | compile |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['size']} | {r['stage']} | {r['topology'] or r.get('chip')} |"
        if "error" in r:
            lines.append(f"{head} | failed: {r['error'][:120]} | | | | | | |")
            continue
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
        peak = r["peak_bytes_per_device"]
        mfu = f"{100 * r['estimated_mfu']:.1f} %" if r.get("estimated_mfu") is not None else "-"
        ratio = f"{r['useful_over_compiled']:.2f}" if r.get("useful_over_compiled") else "-"
        lines.append(f"{head} {mesh} | {peak / 2 ** 30:.1f} GiB ({100 * peak / (r['memory_gb'] * 1e9):.0f} %) | "
                     f"{r['collective_bytes_per_device'] / 1e9:.1f} GB | {1e3 * r['optimal_seconds']:.0f} ms | "
                     f"{r['useful_flops'] / 1e15:.2f} | {ratio} | {mfu} | {r['compile_s']['compile']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1b,7b")
    ap.add_argument("--stages", default="stage1_und,stage1_gen,stage2:aia")
    ap.add_argument("--topologies", default="v5p:4x4x4,v6e:8x8")
    ap.add_argument("--mesh", default="", help="override the recipe's mesh (default: MESHES)")
    ap.add_argument("--fake_devices", action="store_true", help="64 fake CPU devices instead of a topology")
    ap.add_argument("--chip", default="h100", help="with --fake_devices: the chip to check memory against")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "plan.json"))
    args, extra = ap.parse_known_args()
    args.extra = extra  # passed through to unijax.plan, e.g. --config.model.remat_policy=none
    topologies = [None] if args.fake_devices else args.topologies.split(",")
    rows = [run_one(size, stage, topo, args) for topo in topologies for size in args.sizes.split(",")
            for stage in args.stages.split(",")]
    print(f"\n128 rows x 1024 tokens per step; {' '.join(extra) or 'the recipes as they are'}\n")
    print(table(rows))
    write_json(args.out, {"meta": machine_meta(topologies=topologies, extra=extra), "rows": rows})


if __name__ == "__main__":
    main()
