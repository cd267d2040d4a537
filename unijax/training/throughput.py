"""How fast a step runs against what the device could do: the model FLOPs of one train step and the
device's peak, for the log's tokens/s per device, TFLOP/s per device and MFU.

Model FLOPs are XLA's cost analysis of the train step as lowered, before SPMD partitioning: the
whole global batch (all devices), forward + backward + the optimizer update, for the model
*unscanned, without remat and as one batch*. XLA counts a while loop's body once, so a scanned
decoder (`model.scan_layers=True`) would be counted as one layer and gradient accumulation
(`train.grad_accum_steps`) as one micro-batch, and rematerialisation is recomputation, not model
work; so when the run does any of these, a copy of its step with none of them is lowered (abstract
parameters, nothing compiled or allocated) and counted instead. Per device is that
number divided by the number of devices. This is the number `python -m unijax.plan` prints as
"model FLOPs per step"; with remat the hardware does more (MaxText's HFU vs MFU), which MFU does not
credit.

    MFU = model FLOPs per step per device / step time / peak FLOP/s per device

Peak: `train.peak_tflops` (per device) when set, else the dense bf16 peak of the device kind
(`PEAK_TFLOPS`, from the vendors' data sheets); on CPU or an unknown kind MFU is not logged.
"""

from __future__ import annotations

import copy

import jax

from unijax import checkpoints, sharding
from unijax.data import pipeline
from unijax.training import setup as train_setup
from unijax.training import steps

PEAK_TFLOPS = {  # dense bf16 TFLOP/s per chip (no 2:4 sparsity), from the vendors' data sheets
    "h100": 989.0, "h100_pcie": 756.0, "h200": 989.0, "a100": 312.0, "b200": 2250.0, "l40s": 362.0,
    "tpu_v4": 275.0, "tpu_v5e": 197.0, "tpu_v5p": 459.0, "tpu_v6e": 918.0,
}
_TPU_KINDS = {"tpu v4": "tpu_v4", "tpu v5 lite": "tpu_v5e", "tpu v5e": "tpu_v5e", "tpu v5": "tpu_v5p",
              "tpu v5p": "tpu_v5p", "tpu v6 lite": "tpu_v6e", "tpu v6e": "tpu_v6e"}


def chip_of(device_kind: str) -> str | None:
    """`jax.Device.device_kind` -> a `PEAK_TFLOPS` key, or None for a kind not in the table.
    ("NVIDIA H100 80GB HBM3" -> h100 (SXM), "NVIDIA H100 PCIe" -> h100_pcie, "TPU v5 lite" -> tpu_v5e.)"""
    kind = device_kind.lower().strip()
    if kind in _TPU_KINDS:
        return _TPU_KINDS[kind]
    if kind.startswith("nvidia"):
        for chip in ("h100", "h200", "a100", "b200", "l40s"):
            if chip in kind:
                return "h100_pcie" if chip == "h100" and "pcie" in kind else chip
    return None


def peak_tflops(config, device: jax.Device) -> float | None:
    """Peak TFLOP/s of one device: `train.peak_tflops`, else the device kind's; None when unknown."""
    if float(config.train.peak_tflops) > 0:
        return float(config.train.peak_tflops)
    chip = chip_of(device.device_kind)
    return PEAK_TFLOPS[chip] if chip else None


def flops_of(lowered) -> float:
    """The `flops` entry of a lowered or compiled computation's cost analysis (0 when absent)."""
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def abstract_batch(layout: pipeline.Layout, batch_size: int, mesh: jax.sharding.Mesh) -> dict:
    """ShapeDtypeStructs (with the batch sharding) of the global batch the train step takes."""
    batch_sh = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh)
            for k, (shape, dtype) in pipeline.batch_spec(layout, batch_size).items()}


def lower_step(config, cfg, mesh: jax.sharding.Mesh, batch: dict):
    """The training loop's step for model config `cfg` with abstract parameters, lowered for `batch`
    (nothing is allocated or compiled). -> (the abstract `Setup`, the `jax.stages.Lowered`)."""
    setup = train_setup.build(checkpoints.abstract_model(cfg), config, mesh, abstract=True)
    images_per_row = pipeline.Layout.for_data(cfg, config.data).images_per_row(config.data.packing)
    loss_fn, _ = steps.objective(config, images_per_row, cfg.text.num_layers)
    step = train_setup.jit_train_step(setup, config, mesh, loss_fn)
    with jax.set_mesh(mesh):
        return setup, step.lower(setup.state, setup.frozen, batch)


def model_flops(config, cfg, mesh: jax.sharding.Mesh, batch: dict, lower_own=None) -> float:
    """Model FLOPs of one train step over the global `batch` (all devices together). `lower_own`:
    a callable lowering the caller's own step for `cfg`, used when that step has no loop to
    undercount (no scanned layers, no remat, no gradient-accumulation scan)."""
    plain = cfg.replace(scan_layers=False, remat_policy="none")
    accum = int(config.train.get("grad_accum_steps", 1))
    if lower_own is not None and plain == cfg and accum == 1:
        with jax.set_mesh(mesh):
            return flops_of(lower_own())
    if accum != 1:  # the micro-batch scan would count one micro-batch: the whole batch at once is the same math
        config = copy.deepcopy(config)
        with config.unlocked():
            config.train.grad_accum_steps = 1
    return flops_of(lower_step(config, plain, mesh, batch)[1])


def rates(tokens: int, seconds: float, steps: int, flops_per_device: float, peak: float | None,
          local_devices: int) -> dict[str, float]:
    """A logging window's speed: `tokens` (this process's non-padding tokens) over `steps` steps in
    `seconds` -> tokens/s per device, seconds per step and, with the FLOPs known, model TFLOP/s per
    device and (with a peak) MFU."""
    step_time = seconds / max(steps, 1)
    out = {"tokens_per_s_per_device": tokens / max(seconds, 1e-9) / local_devices, "step_time_s": step_time}
    if flops_per_device > 0:
        achieved = flops_per_device / max(step_time, 1e-9)
        out["model_tflops_per_s_per_device"] = achieved / 1e12
        if peak:
            out["mfu"] = achieved / (peak * 1e12)
    return out
