"""Where the time of bench/train_step.py's unijax step goes: a `jax.profiler` trace of timed steps
and the compiled HLO, summarised by kind of operation.

    python bench/profile_step.py --size 100m --step dense        # -> bench/results/profile_100m_dense.json
    python bench/profile_step.py --size tiny --step stage2 --keep /tmp/prof

The step is `bench.train_step.build_unijax`'s (the same program the bench times). After warm-up,
`--steps` steps run under `jax.profiler.trace` (with a Perfetto trace); every XLA CPU thunk in it
is attributed to one kind by its HLO instruction: `matmul` (dot fusions: YNNPACK `ynn_fusion`,
oneDNN / XNNPACK ones, plain `dot`), `copy / transpose` (layout changes, including elementwise
work fused into a transposed write), `elementwise / reduce` (the other loop and input fusions) and
`other`. Printed: time per step by kind, the top instructions with the JAX operation they come
from (HLO metadata), and the HLO's top-level instruction counts. `--keep DIR` keeps the trace
(TensorBoard / Perfetto) and the HLO text.
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
import collections  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

KINDS = ("matmul", "copy / transpose", "elementwise / reduce", "other")


def kind_of(name: str) -> str:
    if name.startswith(("ynn_fusion", "xnn_fusion", "onednn", "dot")) or "dot_fusion" in name:
        return "matmul"
    if "copy" in name or "transpose" in name:
        return "copy / transpose"
    if "fusion" in name or name.startswith(("reduce", "add", "multiply", "select", "exponential")):
        return "elementwise / reduce"
    return "other"


def hlo_ops(hlo: str) -> tuple[dict[str, str], collections.Counter]:
    """-> ({instruction: the JAX op_name it comes from}, top-level instruction counts) of the ENTRY."""
    entry = hlo[hlo.index("ENTRY"):]
    entry = entry[: entry.index("\n}\n")]
    origin, counts = {}, collections.Counter()
    for line in entry.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(", line)
        if m:
            counts[m.group(2)] += 1
            op = re.search(r'op_name="([^"]+)"', line)
            origin[m.group(1)] = op.group(1) if op else ""
    return origin, counts


def thunk_times(trace_dir: str) -> collections.Counter:
    """Total microseconds per XLA instruction name in the Perfetto trace under `trace_dir`."""
    files = sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))
    if not files:
        raise RuntimeError(f"no Perfetto trace under {trace_dir}")
    events = json.load(gzip.open(files[-1]))["traceEvents"]
    out = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith("$") and "::" not in e["name"] and \
                not e["name"].startswith(("PjitFunction", "SlinkyThreadPool", "DevicePut", "Allocate")):
            out[e["name"]] += e.get("dur", 0)
    return out


def main():
    import jax

    from bench.common import machine_meta, write_json
    from bench.train_step import SIZES, STEPS, build_unijax

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="100m", choices=sorted(SIZES))
    p.add_argument("--step", default="dense", choices=STEPS)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--keep", default="", help="directory for the trace and the HLO text (default: a temp dir)")
    p.add_argument("--json", default="")
    args = p.parse_args()

    train_step, state, frozen, tokens = build_unijax(SIZES[args.size], args.step, args.batch, args.seq)
    hlo = train_step.lower(state, frozen, tokens).compile().as_text()
    for _ in range(2):  # compile and warm up
        state, loss = train_step(state, frozen, tokens)
        loss.block_until_ready()
    out_dir = args.keep or tempfile.mkdtemp(prefix="unijax_profile_")
    pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(out_dir) / "step.hlo.txt").write_text(hlo)
    t0 = time.perf_counter()
    with jax.profiler.trace(out_dir, create_perfetto_trace=True):
        for _ in range(args.steps):
            state, loss = train_step(state, frozen, tokens)
            loss.block_until_ready()
    traced = (time.perf_counter() - t0) / args.steps

    origin, counts = hlo_ops(hlo)
    times = thunk_times(out_dir)
    per_step = {name: us / args.steps / 1e3 for name, us in times.items() if name in origin}
    by_kind = dict.fromkeys(KINDS, 0.0)
    for name, ms in per_step.items():
        by_kind[kind_of(name)] += ms
    total = sum(by_kind.values())
    print(f"unijax {args.size} {args.step}: {traced * 1e3:.0f} ms per traced step; "
          f"{total:.0f} ms in {len(per_step)} XLA instructions\n")
    print("| kind | ms / step | share |\n|---|---|---|")
    for k in KINDS:
        print(f"| {k} | {by_kind[k]:.1f} | {100 * by_kind[k] / max(total, 1e-9):.0f} % |")
    top = sorted(per_step.items(), key=lambda kv: -kv[1])[:15]
    print("\ntop instructions (ms / step, kind, from):")
    for name, ms in top:
        print(f"  {ms:8.1f}  {name:28s} {kind_of(name):20s} {origin[name][:90]}")
    print("\ntop-level HLO instructions:", dict(counts.most_common(8)))
    if args.keep:
        print(f"trace and HLO kept in {out_dir}")
    write_json(args.json or str(REPO_ROOT / "bench" / "results" / f"profile_{args.size}_{args.step}.json"),
               {"meta": machine_meta(batch=args.batch, seq=args.seq, steps=args.steps),
                "size": args.size, "step": args.step, "traced_step_ms": traced * 1e3, "ms_by_kind": by_kind,
                "top": [{"name": n, "ms": ms, "kind": kind_of(n), "from": origin[n]} for n, ms in top],
                "hlo_counts": dict(counts)})


if __name__ == "__main__":
    main()
