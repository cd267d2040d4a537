"""Will this configuration fit? Compile the train step for a mesh before paying for it.

    python -m unijax.plan --config configs/stage2.py --config.model.preset=janus_pro_7b \\
        --mesh data=8,fsdp=8 --config.train.batch_size=64 --config.data.max_len=1024 --chip h100

builds the training loop's own train step (`unijax.training.setup`: trainable/frozen split, LoRA,
AdamW, shardings) with abstract parameters (`nnx.eval_shape`: nothing is allocated), lowers and
compiles it for the mesh, and prints per-device bytes of trainable parameters, frozen parameters,
optimizer state, the batch and XLA's temporaries (`compiled.memory_analysis()`), the FLOPs of one
step (`compiled.cost_analysis()`), and the model-FLOPs utilisation a step time would mean on the
chosen chip. `--json PATH` writes the same numbers.

`--topology v5p:4x4x4` (also `v4:...`, `v5e:...`, `v6e:...`) compiles for that TPU slice with the real
TPU compiler, on this host's CPU (libtpu: `pip install -e .[tpu]`), as MaxText's `train_compile.py`
does: the memory is the TPU compiler's, and the compiled, partitioned HLO gives FLOPs, HBM bytes
and collective bytes per device with every loop counted per trip, a roofline step time and the
MFU it implies (`unijax.training.roofline`; the compiler's own `optimal_seconds` is reported and
used only where it is valid). `--hlo PATH` writes the compiled HLO text.

`--topology h100:4x8` (4 hosts x 8 GPUs; also `h100:8`, `h200:...`) does the same for GPUs with XLA's
GPU compiler, compile-only, through jax's CUDA plugin on a host without a GPU
(`unijax.training.gpu_targets`; docs/gpu.md says how to install the plugin next to the repo's
environment). The roofline reads cuBLAS / cuDNN calls from their shapes, and collectives between hosts
at the network's bandwidth rather than NVLink's. The GPU compiler gives no cost analysis of its own.

Without `--topology`: when this machine has as many devices as the mesh, the plan compiles for
them. Otherwise it compiles for that many fake CPU devices (`--xla_force_host_platform_device_count`, set before
JAX starts): the sharding and the per-device parameter, optimizer and batch bytes are exact; XLA's
temporaries and FLOPs are those of the CPU compiler, an estimate of what a GPU / TPU compile
needs (fusion and scheduling differ; the per-device arithmetic does not): an estimate, labelled as
such. Kernel choices (`model.attention_impl=auto`, `moe.impl=auto`) resolve for the platform compiled
for.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time

import jax
import numpy as np
from absl import app, flags
from jax._src import xla_bridge
from jax.experimental import topologies
from ml_collections import config_flags

from unijax import cli, sharding
from unijax.data import pipeline
from unijax.io import write_outputs
from unijax.sharding import MESH_AXES
from unijax.training import gpu_targets, objectives, roofline, steps, throughput
from unijax.training.config import model_config, validate
from unijax.training.params import count
from unijax.training.throughput import PEAK_TFLOPS

MEMORY_GB = {chip: spec["hbm_gb"] for chip, spec in roofline.CHIPS.items()}


def topology_devices(name: str) -> list:
    """The devices of TPU slice `name` (`v5p:4x4x4`) for the TPU compiler on this host (no TPU needed),
    or of GPU topology `name` (`h100:2x8`: `gpu_targets`) for the GPU compiler (no GPU needed)."""
    if roofline.chip_of_topology(name) in gpu_targets.TARGET_CONFIGS:
        return gpu_targets.devices(name)
    # compiling needs no TPU: let several processes (test workers, plans side by side) load libtpu
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:  # loads libtpu
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as e:  # libtpu missing, or a shape the TPU compiler does not know
        raise ValueError(f"--topology={name!r}: no TPU topology ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         f"libtpu comes with `pip install -e .[tpu]`") from None


def parse_mesh(text: str) -> dict[str, int]:
    """`data=8,fsdp=8` -> {"data": 8, "fsdp": 8}; every other axis stays 1."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name not in MESH_AXES or not value.lstrip("-").isdigit():
            raise ValueError(f"--mesh {text!r}: expected comma-separated axis=size with axes among {MESH_AXES}, "
                             f"e.g. data=8,fsdp=8")
        out[name] = int(value)
    return out


def _mesh_arg(argv) -> str:
    for i, a in enumerate(argv):
        if a.startswith("--mesh="):
            return a.split("=", 1)[1]
        if a == "--mesh" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def _fake_cpu_devices(argv) -> None:
    """Before JAX starts its backends: enough host-platform (CPU) devices for the requested mesh; for a
    topology, only the CPU backend (a compile-only GPU topology needs no CUDA, and the CUDA plugin
    would fail to start without it)."""
    if xla_bridge.backends_are_initialized():
        return
    if any(a.startswith("--topology") for a in argv):
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        return
    try:
        sizes = parse_mesh(_mesh_arg(argv))
    except ValueError:
        return  # reported with the other flag errors in main
    n = math.prod(s for s in sizes.values() if s > 0) if sizes else 1
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags and n > 1:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def plan(config, mesh_sizes: dict[str, int] | None = None, chip: str = "h100", step_time: float = 0.0,
         memory_gb: float = 0.0, topology: str = "", hlo_path: str = "") -> dict:
    """Lowers and compiles the configured train step; returns the numbers `main` prints. `topology`:
    a TPU slice to compile for with the TPU compiler, or a GPU topology (`h100:2x8`) for the GPU
    compiler (its chip replaces `chip`)."""
    if topology:
        chip = roofline.chip_of_topology(topology)
    if chip not in PEAK_TFLOPS:
        raise ValueError(f"--chip={chip!r}: expected one of {sorted(PEAK_TFLOPS)}")
    if mesh_sizes:
        with config.unlocked():
            for axis in sharding.MESH_AXES:
                config.mesh[axis] = mesh_sizes.get(axis, 1)
    validate(config)
    cfg = model_config(config)
    devices = topology_devices(topology) if topology else jax.devices()
    sizes = {a: int(config.mesh[a]) for a in sharding.MESH_AXES}
    if topology and math.prod(s for s in sizes.values() if s > 0) > len(devices):
        raise ValueError(f"--mesh needs {math.prod(sizes.values())} devices; topology {topology} has {len(devices)}")
    if not topology and -1 not in sizes.values() and math.prod(sizes.values()) != len(devices):
        wanted = math.prod(sizes.values())
        devices = jax.devices("cpu")
        if len(devices) < wanted:
            raise ValueError(f"--mesh needs {wanted} devices; this process has {len(devices)} CPU devices (run "
                             f"`python -m unijax.plan` in a fresh process so it can create them)")
        devices = devices[:wanted]
    mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch("train.batch_size", config.train.batch_size, mesh)
    layout = pipeline.Layout.for_data(cfg, config.data)
    if config.data.max_len < layout.und_tokens + 2 or config.data.max_len < layout.gen_tokens + 2:
        raise ValueError(f"data.max_len={config.data.max_len} cannot hold one image ({layout.und_tokens} "
                         f"understanding / {layout.gen_tokens} generation tokens at {layout.image_size}px); raise it")

    batch = throughput.abstract_batch(layout, config.train.batch_size, mesh, objectives.get(config))
    t0 = time.perf_counter()
    setup, lowered = throughput.lower_step(config, cfg, mesh, batch)
    t1 = time.perf_counter()
    with jax.set_mesh(mesh):
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a program that cannot fit
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            raise ValueError(f"does not fit on {devices[0].device_kind}: {str(e).splitlines()[0].split(': ', 1)[-1]} "
                             f"(more remat: model.remat_policy=full, a smaller train.batch_size, or more devices)") from None
    t2 = time.perf_counter()
    # Model FLOPs: XLA's count of the whole (unpartitioned) step as the math needs it. Its cost
    # analysis counts a while loop's body once, so a scanned decoder is counted unscanned, and
    # without remat (recomputation is not model work); the training log's MFU uses the same number.
    if devices[0].platform == "cpu":
        model_flops = throughput.model_flops(config, cfg, mesh, batch, lambda: lowered)
    else:  # XLA counts a lowered program on the host: the same global step on one CPU device
        host = sharding.make_mesh({}, jax.devices("cpu")[:1])
        model_flops = throughput.model_flops(config, cfg, host, throughput.abstract_batch(layout, config.train.batch_size, host,
                                                                                       objectives.get(config)))
    useful = throughput.useful_flops(config, cfg, layout, setup.state["params"])
    hlo = compiled.as_text()
    if hlo_path:
        write_outputs(pathlib.Path(hlo_path).parent, {pathlib.Path(hlo_path).name: lambda p: p.write_text(hlo)})
    on_target = devices[0].platform != "cpu"
    per_host = gpu_targets.parse(topology)[2] if chip in gpu_targets.TARGET_CONFIGS and topology else 0
    cost = roofline.summary(roofline.analyse(hlo, chip, mesh.size, per_host), chip, roofline.compiler_cost(compiled))

    params = setup.state["params"]
    adapters = params.get("lora", {})
    mem = compiled.memory_analysis()
    n_dev = mesh.size
    per_dev = {
        "trainable_params": per_device_bytes({k: v for k, v in params.items() if k != "lora"}),
        "lora_adapters": per_device_bytes(adapters),
        "frozen_params": per_device_bytes(steps.without_reference(setup.frozen)),
        "reference_params": per_device_bytes(setup.frozen.get(steps.REFERENCE, {})),
        "optimizer_state": per_device_bytes(setup.state["opt_state"]),
        "batch": per_device_bytes(batch),
    }
    arguments = int(getattr(mem, "argument_size_in_bytes", 0))
    outputs = int(getattr(mem, "output_size_in_bytes", 0))
    aliased = int(getattr(mem, "alias_size_in_bytes", 0))
    temp = int(getattr(mem, "temp_size_in_bytes", 0))
    # resident: everything the device holds between steps (jit prunes arguments the step never reads,
    # e.g. the VQ decoder, from XLA's argument bytes, but they stay in memory)
    resident = sum(per_dev.values())
    per_dev.update(resident=resident, temporaries=temp, xla_arguments=arguments,
                   outputs_not_aliased=max(outputs - aliased, 0), peak=resident + max(outputs - aliased, 0) + temp)
    flops = model_flops / mesh.size  # per device (the partitioned program does 1 / devices of the math)
    tokens = config.train.batch_size * config.data.max_len
    peak_flops = PEAK_TFLOPS[chip] * 1e12
    memory_gb = memory_gb or MEMORY_GB[chip]
    out = {
        "config": {"preset": config.model.preset, "ffn": config.model.ffn, "lora_rank": int(config.model.lora.rank),
                   "dtype": config.model.dtype, "param_dtype": config.model.param_dtype,
                   "scan_layers": bool(config.model.scan_layers), "remat_policy": config.model.remat_policy,
                   "batch_size": int(config.train.batch_size), "max_len": int(config.data.max_len),
                   "moe_impl": config.moe.impl},
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "devices": f"{n_dev} x {devices[0].device_kind if on_target else devices[0].platform}"
                   + (f" ({topology}, {devices[0].platform.upper()} compiler)" if topology else "" if on_target
                      else " (fake, standing in for the target: memory, FLOPs and time are estimates)"),
        "topology": topology or None,
        "parameters": {"total": count(params) + count(steps.without_reference(setup.frozen)), "trainable": count(params),
                       "lora": count(adapters)},
        "per_device_bytes": per_dev,
        "memory_gb": memory_gb,
        "fits": per_dev["peak"] <= memory_gb * 1e9,
        "flops_per_step_per_device": flops,
        "flops_per_step": model_flops,
        "compiled_flops_per_device": throughput.flops_of(compiled),  # scanned layers counted once; remat included
        "tokens_per_step": tokens,
        "chip": chip,
        "peak_tflops_per_chip": PEAK_TFLOPS[chip],
        "step_time_at_full_mfu_s": flops / peak_flops if flops else None,
        "compile_s": {"lower": round(t1 - t0, 2), "compile": round(t2 - t1, 2)},
        # stable keys (docs/benchmarks.md): per device and step, from the compiled program
        "peak_bytes_per_device": per_dev["peak"],
        "model_flops": model_flops,
        "useful_flops": useful["total"],
        "useful_flops_parts": useful,
        "useful_over_compiled": useful["total"] / mesh.size / cost["flops_per_device"] if cost["flops_per_device"] else None,
        "collective_bytes_per_device": cost["collective_bytes_per_device"],
        "compiled_cost": cost,
    }
    estimate = cost["compiler_optimal_seconds"] if cost["compiler_estimate_valid"] else cost["seconds"]
    out["optimal_seconds"] = estimate
    out["step_time_source"] = "compiler" if cost["compiler_estimate_valid"] else "roofline"
    # MFU credits the useful FLOPs only (no capacity slots, heads at loss positions, frozen weights without gradients)
    out["estimated_mfu"] = useful["total"] / mesh.size / (estimate * peak_flops) if estimate and on_target else None
    if step_time > 0 and flops:
        out["step_time_s"] = step_time
        out["mfu"] = flops / (step_time * peak_flops)
        out["tokens_per_s"] = tokens / step_time
    return out


def mesh_size(r: dict) -> int:
    return math.prod(r["mesh"].values())


def _gib(b: int) -> str:
    return f"{b / 2 ** 30:8.2f} GiB"


def table(r: dict) -> str:
    c, p, b = r["config"], r["parameters"], r["per_device_bytes"]
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
    lines = [
        f"plan: preset {c['preset']}, ffn {c['ffn']}, LoRA rank {c['lora_rank']}, dtype {c['dtype']} / params "
        f"{c['param_dtype']}, scan {c['scan_layers']}, remat {c['remat_policy']}",
        f"      batch {c['batch_size']} x {c['max_len']} tokens, mesh {mesh} on {r['devices']}",
        f"parameters: {p['total'] / 1e9:.3f}B total, {p['trainable'] / 1e6:.1f}M trainable "
        f"({p['lora'] / 1e6:.1f}M LoRA)",
        "per device:",
    ]
    for key, label in (("trainable_params", "trainable parameters"), ("lora_adapters", "LoRA adapters"),
                       ("frozen_params", "frozen parameters"), ("reference_params", "reference copy (DPO)"),
                       ("optimizer_state", "optimizer state"),
                       ("batch", "batch"), ("temporaries", "XLA temporaries"),
                       ("outputs_not_aliased", "outputs not donated"),
                       ("peak", "peak (all of the above)")):
        lines.append(f"  {label:<30}{_gib(b[key])}")
    lines.append(f"  fits in {r['memory_gb']:g} GB per device: {'yes' if r['fits'] else 'NO'}")
    f = r["flops_per_step_per_device"]
    lines.append(f"model FLOPs per step: {r['flops_per_step'] / 1e15:.3f} PFLOP ({f / 1e12:.2f} TFLOP per device; "
                 f"{r['tokens_per_step']:,} tokens)")
    if r.get("step_time_at_full_mfu_s"):
        lines.append(f"{r['chip']} ({r['peak_tflops_per_chip']:g} TFLOP/s bf16): a step takes >= "
                     f"{r['step_time_at_full_mfu_s']:.3f} s at 100% MFU, {2 * r['step_time_at_full_mfu_s']:.3f} s "
                     f"at 50%")
    if "mfu" in r:
        lines.append(f"a {r['step_time_s']:g} s step would be {100 * r['mfu']:.1f}% MFU "
                     f"({r['tokens_per_s']:,.0f} tokens/s)")
    k = r["compiled_cost"]
    lines.append(f"compiled program, per device and step (loops counted per trip): {k['flops_per_device'] / 1e12:.2f} "
                 f"TFLOP, {k['hbm_bytes_per_device'] / 1e9:.2f} GB HBM traffic")
    kinds = ", ".join(f"{name} {b / 1e9:.2f} GB" for name, b in k["collective_bytes_by_kind"].items()) or "none"
    spec, between = roofline.CHIPS[r["chip"]], k.get("collective_bytes_between_hosts_per_device", 0.0)
    hosts = f", {between / 1e9:.2f} GB of it between hosts at {spec['dcn_gbps']:g} GB/s" if between else ""
    lines.append(f"collectives: {k['collective_bytes_per_device'] / 1e9:.2f} GB per device ({kinds}), "
                 f"{k['collective_seconds'] * 1e3:.1f} ms at {spec['ici_gbps']:g} GB/s{hosts}")
    uf = r["useful_flops"] / max(mesh_size(r), 1)
    lines.append(f"useful FLOPs per step: {r['useful_flops'] / 1e15:.3f} PFLOP ({uf / 1e12:.2f} TFLOP per device; "
                 f"{r['useful_over_compiled']:.2f} of the compiled program's)" if r["useful_over_compiled"] else
                 f"useful FLOPs per step: {r['useful_flops'] / 1e15:.3f} PFLOP")
    if r["estimated_mfu"] is not None:
        lines.append(f"step time ({r['step_time_source']}): {r['optimal_seconds'] * 1e3:.1f} ms (compute "
                     f"{k['compute_seconds'] * 1e3:.1f} ms + collectives, no overlap; "
                     f"{k['seconds_overlapped'] * 1e3:.1f} ms overlapped) -> estimated MFU "
                     f"{100 * r['estimated_mfu']:.1f}%; the compiler's optimal_seconds "
                     f"{k['compiler_optimal_seconds']} "
                     f"({'valid' if k['compiler_estimate_valid'] else 'not valid: loops counted once, or ops of unknown cost'})")
    lines.append(f"lowered in {r['compile_s']['lower']:.1f} s, compiled in {r['compile_s']['compile']:.1f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv if argv is None else argv)
    _fake_cpu_devices(argv)
    config_flag = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/stage2.py.",
                                                  lock_config=True)
    flags.DEFINE_string("mesh", "", "Mesh sizes, e.g. data=8,fsdp=8 (overrides config.mesh; other axes are 1).")
    flags.DEFINE_enum("chip", "h100", sorted(PEAK_TFLOPS), "The chip the MFU and the memory limit refer to.")
    flags.DEFINE_float("step_time", 0.0, "A measured (or hoped-for) step time in seconds: prints its MFU.")
    flags.DEFINE_float("memory_gb", 0.0, "Device memory to check against (default: the chip's).")
    flags.DEFINE_string("json", "", "Also write the numbers to this JSON file.")
    flags.DEFINE_string("topology", "", "Compile for this TPU slice with the TPU compiler (libtpu), e.g. v5p:4x4x4, "
                        "v5e:8x8, v6e:8x8, v4:2x2x1, or for GPUs (hosts x GPUs per host) with the GPU compiler "
                        "(jax's CUDA plugin), e.g. h100:8, h100:4x8, h200:2x8; sets the chip.")
    flags.DEFINE_string("hlo", "", "Write the compiled HLO text to this file.")
    flags.mark_flags_as_required(["config"])

    def run(args):
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments {args[1:]}")
        F = flags.FLAGS
        result = plan(config_flag.value, parse_mesh(F.mesh) if F.mesh else None, F.chip, F.step_time, F.memory_gb,
                      F.topology, F.hlo)
        print(table(result))
        if F.json:
            path = pathlib.Path(F.json)
            write_outputs(path.parent, {path.name: lambda p: p.write_text(json.dumps(result, indent=2) + "\n")})
            print(f"wrote {path}")

    cli.run(run, argv=argv)
    return 0


if __name__ == "__main__":
    main()
