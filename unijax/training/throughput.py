"""How fast a step runs against what the device could do: the model FLOPs of one train step and the
device's peak, for the log's tokens/s per device, TFLOP/s per device and MFU.

Model FLOPs are XLA's cost analysis of the train step as lowered, before SPMD partitioning: the
whole global batch (all devices), forward + backward + the optimizer update, for the model
*unscanned, without remat, as one batch and with whole logits*. XLA counts a while loop's body once, so a scanned
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
import math

import jax
import jax.numpy as jnp
from flax import nnx

from unijax import checkpoints, sharding
from unijax.data import pipeline
from unijax.training import objectives, roofline
from unijax.training import setup as train_setup

PEAK_TFLOPS = {chip: spec["tflops"] for chip, spec in roofline.CHIPS.items()}  # dense bf16 TFLOP/s per chip
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


def abstract_batch(layout: pipeline.Layout, batch_size: int, mesh: jax.sharding.Mesh,
                   objective: objectives.Objective | None = None) -> dict:
    """ShapeDtypeStructs (with the batch sharding) of the global batch the train step takes (the
    objective's batch fields; default: the batch contract)."""
    batch_sh = sharding.batch_sharding(mesh)
    spec = (objective or objectives.get("lm")).batch_spec(layout, batch_size)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh) for k, (shape, dtype) in spec.items()}


def lower_step(config, cfg, mesh: jax.sharding.Mesh, batch: dict):
    """The training loop's step for model config `cfg` with abstract parameters, lowered for `batch`
    (nothing is allocated or compiled). -> (the abstract `Setup`, the `jax.stages.Lowered`)."""
    objective = objectives.get(config)
    setup = train_setup.build(checkpoints.abstract_model(cfg), config, mesh, abstract=True,
                              reference=objective.uses_reference)
    images_per_row = pipeline.Layout.for_data(cfg, config.data).images_per_row(config.data.packing)
    loss_fn, _ = objective.functions(config, images_per_row, cfg.text.num_layers)
    step = train_setup.jit_train_step(setup, config, mesh, loss_fn)
    with jax.set_mesh(mesh):
        return setup, step.lower(setup.state, setup.frozen, batch)


def model_flops(config, cfg, mesh: jax.sharding.Mesh, batch: dict, lower_own=None) -> float:
    """Model FLOPs of one train step over the global `batch` (all devices together). `lower_own`:
    a callable lowering the caller's own step for `cfg`, used when that step has no loop to
    undercount (no scanned layers, no remat, no gradient-accumulation scan)."""
    plain = cfg.replace(scan_layers=False, remat_policy="none")
    accum = int(config.train.get("grad_accum_steps", 1))
    chunked = int(config.loss.get("chunk_size", 0)) > 0
    if lower_own is not None and plain == cfg and accum == 1 and not chunked:
        with jax.set_mesh(mesh):
            return flops_of(lower_own())
    if accum != 1 or chunked:  # the micro-batch scan would count one micro-batch (the whole batch at once is
        config = copy.deepcopy(config)  # the same math); the chunked loss rematerialises each chunk's logits
        with config.unlocked():
            config.train.grad_accum_steps = 1
            config.loss.chunk_size = 0
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


def _image_encoder_flops(model, images: int, size: int, encode) -> float:
    """XLA's count of a frozen image encoder's forward over `images` images (lowered on the host CPU,
    nothing compiled); 0 without images."""
    if not images:
        return 0.0
    graphdef, state = nnx.split(model)
    pixels = jax.ShapeDtypeStruct((images, size, size, 3), jnp.float32)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        lowered = jax.jit(lambda s, x: encode(nnx.merge(graphdef, s), x)).lower(state, pixels)
    return flops_of(lowered)


def useful_flops(config, cfg, layout: pipeline.Layout, trainable: dict) -> dict[str, float]:
    """The FLOPs one train step needs, whatever the kernels (what `estimated_mfu` credits), with rows
    full (`batch_size x max_len` real tokens) and the `data.und_ratio : data.gen_ratio` task mix:

    - forward: the decoder on every token (causal attention counted once: each query against half
      the row on average; a TA-MoE layer's top-k experts, the shared expert and the routers, no
      capacity slots), the text head on understanding rows' text positions and the image head on
      generated-image positions only, the vision tower and aligner on understanding images, the
      frozen VQ encoder on generated images (XLA's count of its forward);
    - backward: input gradients through the decoder and heads (what a forward costs), and weight
      gradients of the trainable matrices only (`trainable`, LoRA adapters included), each over
      the rows that pass through it.
    Returns the parts and their `total`."""
    t, m = cfg.text, cfg.moe
    rows, seq = int(config.train.batch_size), int(layout.max_len)
    und_w, gen_w = float(config.data.und_ratio), float(config.data.gen_ratio)
    und_rows = rows * und_w / max(und_w + gen_w, 1e-9) if layout.und_images or gen_w == 0 else 0.0
    gen_rows = rows - und_rows if layout.gen_images else 0.0
    tokens = rows * seq
    e, h, k, d = t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim
    attention = 2 * e * (2 * h * d + 2 * k * d) + 2 * h * d * seq  # projections + scores and values, causal
    dense = 6 * e * t.intermediate_size
    layer_ffn = []
    for i in range(t.num_layers):
        if cfg.ffn == "ta_moe" and m.is_moe_layer(i):
            inner = m.expert_intermediate_size or t.intermediate_size
            layer_ffn.append(6 * e * inner * (m.top_k + m.num_shared_experts) + 2 * e * (2 + 2 * m.num_experts_per_group))
        else:
            layer_ffn.append(dense)
    decoder = tokens * (t.num_layers * attention + sum(layer_ffn))
    und_images = und_rows * (layout.max_images if layout.und_images else 0)
    gen_positions = gen_rows * layout.gen_tokens
    text_positions = und_rows * max(seq - layout.und_tokens * layout.max_images, 0)
    codebook = cfg.vq.num_embeddings
    proj = getattr(cfg.vq, "projection_dim", 0)  # Janus: a generation head of its own; Emu3: a slice of the LM head
    text_head = 2 * e * t.vocab_size * text_positions
    image_head = (2 * (e * proj + proj * codebook) if proj else 2 * e * codebook) * gen_positions
    model = checkpoints.abstract_model(cfg)
    vision = 0.0
    if hasattr(model, "vision_model") and und_images:
        v = cfg.vision
        patches = v.num_patches
        per_layer = 8 * v.hidden_size ** 2 + 4 * v.mlp_ratio * v.hidden_size ** 2 + 4 * patches * v.hidden_size
        vision = und_images * patches * (v.num_layers * per_layer + 2 * v.patch_size ** 2 * v.num_channels * v.hidden_size
                                         + 2 * v.hidden_size * e + 2 * e * e * (v.aligner_depth - 1))
    vq_images = int(round(gen_rows)) + (0 if hasattr(model, "vision_model") else int(round(und_images)))
    vq = _image_encoder_flops(model.vqmodel, vq_images, cfg.vq.image_size, lambda q, x: q.encode(x))
    forward = decoder + text_head + image_head + vision + vq
    rows_through = {"language_model": tokens, "lm_head": text_positions, "generation_head": gen_positions,
                    "generation_aligner": gen_positions, "aligner": und_images * getattr(cfg.vision, "num_patches", 0),
                    "vision_model": und_images * getattr(cfg.vision, "num_patches", 0)}
    weight_grads = 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(trainable)[0]:
        keys = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
        if len(leaf.shape) < 2 or "embed_tokens" in keys or "generation_embeddings" in keys:
            continue  # vectors and lookup tables: no matmul
        top = next((keys[i] for i in range(len(keys)) if keys[i] in rows_through), None)
        through = rows_through.get(top, 0.0)
        if "experts" in keys:  # each expert sees its share of the assignments
            through *= m.top_k / (2 * m.num_experts_per_group)
        weight_grads += 2 * through * math.prod(leaf.shape)  # stacked layers / experts: each slice sees its rows
    input_grads = decoder + text_head + image_head
    parts = {"forward": forward, "input_gradients": input_grads, "weight_gradients": weight_grads,
             "decoder_forward": decoder, "heads_forward": text_head + image_head, "vision_forward": vision,
             "vq_forward": vq}
    parts["total"] = forward + input_grads + weight_grads
    return parts
