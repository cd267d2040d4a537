"""Does Janus-Pro-1B / -7B stage 1 and stage 2 fit? `python -m unijax.plan` for each, one table.

    python bench/plan.py                        # 64-device mesh data=8,fsdp=8 (fake CPU devices here)
    python bench/plan.py --mesh data=4,fsdp=16 --batch 128 --chip h100

Each plan runs in its own process (it creates as many fake CPU devices as the mesh has) with the
settings a real run would use: bfloat16 compute, float32 parameters, scanned layers, full remat,
`--batch` rows of `--max_len` tokens (576 understanding or 576 generated-image tokens at 384 px
plus text). Prints a Markdown table and writes bench/results/plan.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench.common import machine_meta, write_json  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
RUNS = [("janus_pro_1b", "stage1_und"), ("janus_pro_1b", "stage2"), ("janus_pro_7b", "stage1_und"),
        ("janus_pro_7b", "stage2")]


def run_one(preset: str, stage: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "plan.json"
        cmd = [sys.executable, "-m", "unijax.plan", "--config", str(REPO / "configs" / f"{stage}.py"),
               f"--config.model.preset={preset}", f"--mesh={args.mesh}", f"--chip={args.chip}",
               f"--config.train.batch_size={args.batch}", f"--config.data.max_len={args.max_len}",
               "--config.model.dtype=bfloat16", "--config.model.scan_layers=True",
               f"--config.model.remat_policy={args.remat}", f"--json={out}"]
        print("$", " ".join(cmd[1:]), flush=True)
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{preset} {stage} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
        print(proc.stdout, flush=True)
        return dict(json.loads(out.read_text()), command=" ".join(["python"] + cmd[1:-1]))


def gib(b: int) -> str:
    return f"{b / 2 ** 30:.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| model | stage | params (trainable) | trainable + LoRA | frozen | optimizer | temporaries | "
             "peak / device | fits 80 GB | PFLOP / step | step at 50% MFU |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, p = r["per_device_bytes"], r["parameters"]
        lines.append(
            f"| {r['config']['preset']} | {r['stage']} | {p['total'] / 1e9:.2f}B ({p['trainable'] / 1e6:,.0f}M) | "
            f"{gib(b['trainable_params'] + b['lora_adapters'])} | {gib(b['frozen_params'])} | "
            f"{gib(b['optimizer_state'])} | {gib(b['temporaries'])} | **{gib(b['peak'])}** | "
            f"{'yes' if r['fits'] else 'no'} | {r['flops_per_step'] / 1e15:.2f} | "
            f"{2 * r['step_time_at_full_mfu_s']:.2f} s |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mesh", default="data=8,fsdp=8")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max_len", type=int, default=1024)
    ap.add_argument("--remat", default="full")
    ap.add_argument("--chip", default="h100")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "plan.json"))
    args = ap.parse_args()
    rows = [dict(run_one(preset, stage, args), stage=stage) for preset, stage in RUNS]
    print(f"\nmesh {args.mesh}, batch {args.batch} x {args.max_len} tokens, bf16 compute, f32 params, scanned layers, "
          f"remat {args.remat}; GiB per device; {args.chip}\n")
    print(table(rows))
    write_json(args.out, {"meta": machine_meta(mesh=args.mesh, batch=args.batch, max_len=args.max_len,
                                               chip=args.chip), "rows": rows})


if __name__ == "__main__":
    main()
