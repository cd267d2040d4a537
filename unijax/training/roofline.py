"""What a compiled program costs on its target chip, read from the compiled (partitioned, optimised)
HLO: FLOPs, memory traffic and collective bytes per device, every loop body counted once per trip.

XLA's own `cost_analysis()` counts a while loop's body once, so a scanned decoder (and a micro-batch
scan) is undercounted by its trip count; on TPU its `optimal_seconds` also adds -1 s for every
custom call that carries no cost estimate (the ragged-dot metadata kernel of `jax.lax.ragged_dot`
is one: a program with a dropless MoE layer gets a negative step time). So this module reads the
compiled HLO text itself:

- the call graph from the entry computation: a while loop's body runs `trip` times (the loop
  `counter < N` with the counter's initial constant; JAX's scans and fori loops have this form),
  fusions and calls once per execution of their caller; a conditional as its costliest branch taken
  (as XLA's cost analysis counts it: an upper bound; `conditional_flops_per_device` says how much
  of the count is such branches);
- per top-level instruction (a fusion, a custom call, a copy, ...): FLOPs of the dots and
  convolutions inside it (a Pallas kernel's from its `cost_estimate`), and the bytes of its
  operands and results (what moves between HBM and the core);
- per collective (all-gather, reduce-scatter, all-reduce, all-to-all (ragged ones too),
  collective-permute, also inside async pairs and the TPU's fused all-reduce-scatter): the bytes each device sends over the
  interconnect with ring algorithms: `(n - 1) / n` of the gathered / scattered / exchanged array,
  twice that for an all-reduce, where n is the replica group's size.

GPU programs (`plan --topology h100:...`) call libraries whose FLOPs are read from their shapes:
cuBLAS GEMMs, cuDNN convolutions and cuDNN fused attention (`_gpu_custom_call_flops`). A collective
whose replica groups span hosts moves over the network (`dcn_gbps`), not NVLink.

The step-time estimate is a roofline: every instruction takes `max(FLOPs / peak, bytes / HBM
bandwidth)`, and the collectives take their bytes over the chip's ICI bandwidth on top
(`seconds`, no overlap: an upper bound) or hidden under compute (`seconds_overlapped`: a lower
bound). `optimal_seconds` of the compiler is kept and reported as valid only for a program with no
multi-trip loop and no op of unknown cost, where it is the compiler's own estimate of the whole.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

import numpy as np

# Per chip: dense bf16 peak (TFLOP/s), HBM (GB), HBM bandwidth (GB/s), interconnect bandwidth per chip
# (GB/s, one direction: ICI for TPUs, NVLink for GPUs), from the vendors' data sheets; GPUs also the
# network between hosts per GPU (`dcn_gbps`: one 400 Gb/s InfiniBand NIC per H100 / H200 / B200, 200 Gb/s
# per A100, as in NVIDIA's DGX reference designs).
CHIPS = {
    "tpu_v4": dict(tflops=275.0, hbm_gb=32, hbm_gbps=1200.0, ici_gbps=300.0),
    "tpu_v5e": dict(tflops=197.0, hbm_gb=16, hbm_gbps=819.0, ici_gbps=200.0),
    "tpu_v5p": dict(tflops=459.0, hbm_gb=95, hbm_gbps=2765.0, ici_gbps=600.0),
    "tpu_v6e": dict(tflops=918.0, hbm_gb=32, hbm_gbps=1640.0, ici_gbps=448.0),
    "h100": dict(tflops=989.0, hbm_gb=80, hbm_gbps=3350.0, ici_gbps=450.0, dcn_gbps=50.0),
    "h100_pcie": dict(tflops=756.0, hbm_gb=80, hbm_gbps=2000.0, ici_gbps=300.0, dcn_gbps=25.0),
    "h200": dict(tflops=989.0, hbm_gb=141, hbm_gbps=4800.0, ici_gbps=450.0, dcn_gbps=50.0),
    "a100": dict(tflops=312.0, hbm_gb=80, hbm_gbps=2039.0, ici_gbps=300.0, dcn_gbps=25.0),
    "b200": dict(tflops=2250.0, hbm_gb=192, hbm_gbps=8000.0, ici_gbps=900.0, dcn_gbps=50.0),
    "l40s": dict(tflops=362.0, hbm_gb=48, hbm_gbps=864.0, ici_gbps=32.0, dcn_gbps=12.5),
}
# `--topology` names (jax.experimental.topologies) -> chip
TOPOLOGY_CHIPS = {"v4": "tpu_v4", "v5e": "tpu_v5e", "v5litepod": "tpu_v5e", "v5p": "tpu_v5p", "v6e": "tpu_v6e",
                  "h100": "h100", "h200": "h200"}

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1,
                "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
# ops that move nothing themselves (views, tuples, control) or are counted through their callees
_FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while", "call", "conditional",
         "after-all", "partition-id", "replica-id", "iota", "all-gather-done", "all-reduce-done",
         "collective-permute-done", "copy-done", "slice-done", "send-done", "recv-done", "opt-barrier", "add-dependency",
         "get-dimension-size"}


def chip_of_topology(name: str) -> str:
    """`v5p:4x4x4` -> `tpu_v5p` (ValueError for a name outside `TOPOLOGY_CHIPS`)."""
    kind = name.split(":", 1)[0].split("-", 1)[0].lower()
    if kind not in TOPOLOGY_CHIPS:
        raise ValueError(f"--topology={name!r}: expected <kind>:<shape> with kind among {sorted(TOPOLOGY_CHIPS)}, "
                         f"e.g. v5p:4x4x4, v5e:8x8, v6e:8x8, v4:2x2x1, h100:8 or h100:4x8 (hosts x GPUs)")
    return TOPOLOGY_CHIPS[kind]


def array_bytes(type_text: str) -> float:
    """Bytes of every array in an HLO type (a shape or a tuple of shapes)."""
    return sum(_DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x)
               for d, dims in _ARRAY.findall(type_text))


def _dims(type_text: str) -> list[int]:
    m = _ARRAY.search(type_text)
    return [int(x) for x in m.group(2).split(",") if x] if m else []


@dataclasses.dataclass
class Instr:
    name: str
    type: str        # result type text
    op: str
    operands: list[str]
    args: str        # the operand list as written (a constant's value)
    attrs: str       # everything after the operand list
    root: bool = False


@dataclasses.dataclass
class Computation:
    name: str
    instrs: list[Instr]

    def types(self) -> dict[str, str]:
        return {i.name: i.type for i in self.instrs}


def _split_operands(text: str) -> tuple[list[str], str, str]:
    """`%a, %b), attr=...` -> (["a", "b"], "%a, %b", "attr=..."): the operand list up to its closing
    parenthesis."""
    depth, i = 1, 0
    while i < len(text) and depth:
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
    inner, rest = text[: i - 1], text[i:]
    names = re.findall(r"%([\w.\-]+)", re.sub(r"\{[^{}]*\}", "", inner))
    return names, inner, rest


def parse(hlo_text: str) -> tuple[dict[str, Computation], str]:
    """Compiled HLO text -> ({name: Computation}, entry name)."""
    comps: dict[str, Computation] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = Computation(m.group(2), [])
                if m.group(1):
                    entry = m.group(2)
            continue
        if line.strip() == "}":
            comps[current.name] = current
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            operands, args, attrs = _split_operands(m.group(5))
            current.instrs.append(Instr(m.group(2), m.group(3), m.group(4), operands, args, attrs, bool(m.group(1))))
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _callees(instr: Instr) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key in ("calls", "to_apply", "body", "condition", "branch_computations", "called_computations"):
        m = re.search(rf"\b{key}=(\{{[^}}]*\}}|%?[\w.\-]+)", instr.attrs)
        if m:
            out[key] = re.findall(r"%?([\w.\-]+)", m.group(1).strip("{}"))
    return out


def trip_count(comps: dict[str, Computation], instr: Instr, by_name: dict[str, Instr]) -> int | None:
    """Trips of a while loop `counter < N` whose counter starts at a constant and grows by a constant
    step in the body (JAX's scans and fori loops, also after the compiler unrolls them); None when
    the loop is not of that form. Reads `known_trip_count` where the backend writes it."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.attrs)
    if m:
        return int(m.group(1))
    cond = comps.get(_callees(instr).get("condition", [""])[0])
    if cond is None:
        return None
    local = {i.name: i for i in cond.instrs}
    root = _root(cond)
    if root is None or root.op != "compare" or "direction=LT" not in root.attrs or len(root.operands) != 2:
        return None
    counter, limit = (local.get(n) for n in root.operands)
    limit_value = _constant(limit, local)
    if counter is None or counter.op != "get-tuple-element" or limit_value is None:
        return None
    index = int(re.search(r"index=(\d+)", counter.attrs).group(1))
    init = by_name.get(instr.operands[0]) if instr.operands else None
    start = None
    if init is not None and init.op == "tuple" and index < len(init.operands):
        start = _constant(by_name.get(init.operands[index]), by_name)
    step = 1
    body = comps.get(_callees(instr).get("body", [""])[0])
    out = _root(body) if body is not None else None
    if out is not None and out.op == "tuple" and index < len(out.operands):
        scope = {i.name: i for i in body.instrs}
        update = scope.get(out.operands[index])
        if update is not None and update.op == "add":
            steps = [c for c in (_constant(scope.get(o), scope) for o in update.operands) if c is not None]
            step = steps[0] if len(steps) == 1 and steps[0] > 0 else 1
    return max(-(-(limit_value - (start if start is not None else 0)) // step), 0)


def _root(comp: Computation) -> Instr | None:
    return next((i for i in comp.instrs if i.root), comp.instrs[-1] if comp.instrs else None)


def _constant(instr: Instr | None, scope: dict[str, Instr]) -> int | None:
    """The integer value of a scalar constant, looking through copies."""
    seen = 0
    while instr is not None and instr.op == "copy" and seen < 8:
        instr, seen = scope.get(instr.operands[0]) if instr.operands else None, seen + 1
    if instr is None or instr.op != "constant":
        return None
    return int(instr.args) if re.fullmatch(r"-?\d+", instr.args.strip()) else None


def _dot_flops(instr: Instr, types: dict[str, str]) -> float:
    out = math.prod(_dims(instr.type))
    if instr.op == "dot":
        lhs = _dims(types.get(instr.operands[0], ""))
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.attrs)
        contract = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m and lhs else 1
        return 2.0 * out * contract
    return _conv_flops(instr, types)


def _ints(text: str | None, n: int, default: int) -> list[int]:
    return [int(v) for v in text.split("x")] if text else [default] * n


def _conv_flops(instr: Instr, types: dict[str, str]) -> float:
    """A convolution's FLOPs: every output element sums the kernel's input features over the window
    taps that land on a real input element. The TPU compiler writes many matmuls as convolutions whose
    spatial dims are not real windows: batch dims as dilated windows (`lhs_dilate` = window size) and
    head dims as padded windows over an input of size 1 (`size=1x32 pad=0_0x31_31`); each counts one
    tap, not its window size. Per spatial dim, the (output, tap) pairs inside the unpadded input are
    counted exactly (stride, padding, window dilation; input holes of `lhs_dilate` pro rata)."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instr.attrs)
    lhs, rhs = (_dims(types.get(o, "")) for o in instr.operands[:2]) if len(instr.operands) > 1 else ([], [])
    out = _dims(instr.type)
    if not labels or not lhs or not rhs or not out or "i" not in labels.group(2):
        return 0.0
    ll, kl, ol = labels.groups()
    spatial = sorted(c for c in kl if c.isdigit())
    window = re.search(r"window=\{([^}]*)\}", instr.attrs)
    text = window.group(1) if window else ""

    def get(key):
        m = re.search(rf"\b{key}=([\dx_]+)", text)
        return m.group(1) if m else None

    n = len(spatial)
    pads = [tuple(int(v) for v in p.split("_")) for p in get("pad").split("x")] if get("pad") else [(0, 0)] * n
    stride, lhs_dil, rhs_dil = _ints(get("stride"), n, 1), _ints(get("lhs_dilate"), n, 1), _ints(get("rhs_dilate"), n, 1)
    taps = 1.0
    for j, d in enumerate(spatial):
        size_in, size_k, size_out = lhs[ll.index(d)], rhs[kl.index(d)], out[ol.index(d)]
        extent = (size_in - 1) * lhs_dil[j] + 1
        pairs = 0.0
        for k in range(size_k):
            c = k * rhs_dil[j] - pads[j][0]  # input position of tap k for output 0
            lo, hi = max(0, math.ceil(-c / stride[j])), (extent - 1 - c) // stride[j]  # outputs it reaches
            pairs += max(0, min(size_out - 1, hi) - lo + 1) / lhs_dil[j]
        taps *= pairs / size_out
    return 2.0 * math.prod(out) * rhs[kl.index("i")] * taps


def _moved_bytes(instr: Instr, types: dict[str, str], comps: dict[str, Computation]) -> float:
    """HBM bytes one top-level instruction reads and writes: its operands and results, except that
    a dynamic slice reads only its slice and a dynamic update slice writes its update in place (the
    scan's per-layer reads of stacked weights and writes of stacked residuals and gradients), also
    inside a fusion."""
    if instr.op == "dynamic-slice":
        return 2 * array_bytes(instr.type)
    if instr.op in ("slice-start", "copy-start"):  # async: (operand alias, result, context) -> the result moves
        arrays = _ARRAY.findall(instr.type)
        if len(arrays) > 1:
            d, dims = arrays[1]
            return 2 * _DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x)
    if instr.op == "dynamic-update-slice" and len(instr.operands) > 1:
        return 2 * array_bytes(types.get(instr.operands[1], ""))
    operands = [array_bytes(types.get(o, "")) for o in instr.operands]
    out = array_bytes(instr.type)
    callee = comps.get(_callees(instr).get("calls", [""])[0]) if instr.op == "fusion" else None
    if callee is None or not callee.instrs:
        return out + sum(operands)
    for i in callee.instrs:
        if i.op == "parameter" and i.args.strip().isdigit() and int(i.args) < len(operands):
            operands[int(i.args)] = _read_bytes(callee, i.name, operands[int(i.args)], comps)
    inner = callee.types()
    by_name = {i.name: i for i in callee.instrs}
    root = _root(callee)
    parts = [by_name.get(o) for o in root.operands] if root.op == "tuple" else [root]
    written = 0.0
    for part in parts:
        while part is not None and part.op == "bitcast" and part.operands:
            part = by_name.get(part.operands[0])
        if part is not None and part.op == "dynamic-update-slice" and len(part.operands) > 1:
            written += array_bytes(inner.get(part.operands[1], ""))
        elif part is not None:
            written += array_bytes(part.type)
    return written + sum(operands)


def _read_bytes(comp: Computation, name: str, full: float, comps: dict[str, Computation], depth: int = 0) -> float:
    """Bytes a fused computation reads of its value `name` (`full` bytes): only the slices its dynamic
    slices take, nothing where it is the buffer a dynamic update slice writes in place, and through
    nested fusions likewise; `full` for any other use."""
    uses = [(i, pos) for i in comp.instrs for pos, o in enumerate(i.operands) if o == name]
    if not uses or depth > 8:
        return full
    total = 0.0
    for user, pos in uses:
        if user.op == "dynamic-slice" and pos == 0:
            total += array_bytes(user.type)
        elif user.op == "dynamic-update-slice" and pos == 0:
            continue
        elif user.op == "bitcast":
            total += _read_bytes(comp, user.name, full, comps, depth + 1)
        elif user.op == "fusion" and (nested := comps.get(_callees(user).get("calls", [""])[0])) is not None:
            param = next((i.name for i in nested.instrs if i.op == "parameter" and i.args.strip() == str(pos)), None)
            total += full if param is None else _read_bytes(nested, param, full, comps, depth + 1)
        else:
            return full
    return min(total, full)


def _active_rows(attrs: str) -> float:
    """The share of a grouped-matmul kernel's row buffer that holds rows: a dropless MoE layer's
    expert-parallel receive buffer is sized for the worst case (every row to one device), and
    megablox visits only the row tiles of its groups; the layer marks its kernels with the scope
    `grouped_rows_active_1_in_<ep>` (`unijax.models.moe`: 1 in ep under balanced routing). Kernels
    estimate their cost for the whole buffer; this scales their FLOPs and their row-shaped operands."""
    m = re.search(r"grouped_rows_active_1_in_(\d+)", attrs)
    return 1.0 / int(m.group(1)) if m else 1.0


# matmuls of [B, H, T, S, D] per splash kernel: forward QK^T and PV; dq recomputes QK^T, then dP and dQ;
# dkv recomputes QK^T, then dV, dP and dK
_SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}


def _splash_flops(instr: Instr, types: dict[str, str]) -> float:
    """FLOPs of a Pallas splash-attention kernel (its custom calls carry no cost estimate): `2 B H T S
    D` per matmul over the causal share of the blocks it visits (512-token blocks, the diagonal ones
    whole). q and k are its first two 4-D operands, `[B, H, T, D]` and `[B, K, S, D]`."""
    kind = next((k for k in ("dkv", "dq", "fwd") if f"_{k}" in instr.name), None)
    shapes = [d for d in (_dims(types.get(o, "")) for o in instr.operands) if len(d) == 4]
    if kind is None or len(shapes) < 2:
        return 0.0
    (b, h, t, d), s = shapes[0], shapes[1][2]
    blocks = max(1, -(-t // 512))
    causal = (blocks + 1) / (2 * blocks)
    return 2.0 * _SPLASH_MATMULS[kind] * b * h * t * s * d * causal


def _gpu_custom_call_flops(instr: Instr, types: dict[str, str], target: str) -> float | None:
    """FLOPs of the GPU compiler's library calls, from their shapes; None for any other target.

    - cuDNN fused attention (`__cudnn$fmha*`): `2 B H T S D` per matmul, two forwards and five
      backwards (the backward recomputes the scores), half of them under a causal mask; `[B, H, T,
      S]` is the call's `intermediate_tensor_shape` and D the last dim of its q operand.
    - cuDNN convolutions (`__cudnn$conv*`): the forward convolution's FLOPs, whose input, kernel and
      output are the call's operands or result depending on the direction.
    - cuBLAS GEMMs (`__cublas$gemm`, `__cublas$lt$matmul`): `2 x output x contracted size`."""
    if target.startswith("__cudnn$fmha"):
        m = re.search(r'"intermediate_tensor_shape":\s*\{\s*"element_type":\s*"?\w+"?,\s*"dimensions":\s*\[([^\]]*)\]',
                      instr.attrs)
        q = _dims(types.get(instr.operands[0], "")) if instr.operands else []
        if not m or not q:
            return None
        b, h, t, s_ = (int(x.strip().strip('"')) for x in m.group(1).split(","))
        causal = 0.5 if re.search(r'"mask_type":\s*"(CAUSAL|PADDING_CAUSAL)"', instr.attrs) else 1.0
        return 2.0 * (5 if "Backward" in target else 2) * b * h * t * s_ * q[-1] * causal
    if target.startswith("__cudnn$conv"):
        operands = [types.get(o, "") for o in instr.operands]
        result = _ARRAY.search(instr.type).group(0) if _ARRAY.search(instr.type) else ""
        if len(operands) < 2:
            return None
        if "BackwardInput" in target:    # (d output, kernel) -> d input
            x, k, y = result, operands[1], operands[0]
        elif "BackwardFilter" in target:  # (input, d output) -> d kernel
            x, k, y = operands[0], result, operands[1]
        else:
            x, k, y = operands[0], operands[1], result
        scope = {"x": x, "k": k}
        return _conv_flops(Instr(instr.name, y, "convolution", ["x", "k"], "", instr.attrs), scope)
    if target.startswith(("__cublas$gemm", "__cublas$lt$matmul")):
        lhs = _dims(types.get(instr.operands[0], "")) if instr.operands else []
        m = re.search(r'"lhs_contracting_dimensions":\s*\[([^\]]*)\]', instr.attrs)
        if not lhs or not m:
            return None
        contract = math.prod(lhs[int(d.strip().strip('"'))] for d in m.group(1).split(",") if d.strip())
        return 2.0 * math.prod(_dims(instr.type)) * contract
    return None


def _iota(dims: str, perm: str | None) -> np.ndarray:
    """XLA's iota device list `[d0,d1,...]T(p0,p1,...)`, flattened."""
    shape = [int(x) for x in dims.split(",") if x]
    ids = np.arange(math.prod(shape)).reshape(shape)
    return (ids.transpose([int(x) for x in perm.split(",")]) if perm else ids).reshape(-1)


def replica_groups(attrs: str, num_devices: int) -> np.ndarray:
    """A collective's replica groups as device ids `[groups, size]`, from any of XLA's notations:
    `{{0,1},{2,3}}`, the iota `[groups,size]<=[dims]T(perm)` and (newer XLA) `mesh['a'=2,'b'=4]
    {'b'}`, optionally with `device_ids=([dims]T(perm))` laid over the mesh; one group of all
    devices when absent."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\[([\d,]*)\](?:T\(([\d,]*)\))?\))?\s*\{([^}]*)\}",
                  attrs)
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        names, grouped = list(sizes), re.findall(r"'([^']+)'", m.group(4))
        ids = _iota(m.group(2), m.group(3)) if m.group(2) else np.arange(math.prod(sizes.values()))
        ids = ids.reshape([sizes[a] for a in names])
        order = [names.index(a) for a in names if a not in grouped] + [names.index(a) for a in grouped]
        return ids.transpose(order).reshape(-1, math.prod(sizes[a] for a in grouped))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]*)\](?:T\(([\d,]*)\))?", attrs)
    if m:
        return _iota(m.group(3), m.group(4)).reshape(int(m.group(1)), int(m.group(2)))
    m = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", attrs)
    if m and m.group(1) != "{}":
        groups = [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
        if len({len(g) for g in groups}) == 1:
            return np.asarray(groups)
    return np.arange(num_devices)[None]


def _group_size(attrs: str, num_devices: int) -> int:
    """Devices in one replica group (`replica_groups`)."""
    return int(replica_groups(attrs, num_devices).shape[1])


def _collective(op: str) -> str | None:
    base = op.removesuffix("-start")
    if base == "ragged-all-to-all":
        return "all-to-all"
    return base if base in COLLECTIVES else None


@dataclasses.dataclass
class Cost:
    flops: float = 0.0
    bytes: float = 0.0
    compute_seconds: float = 0.0
    collective_bytes: dict[str, float] = dataclasses.field(default_factory=lambda: defaultdict(float))
    collective_counts: dict[str, float] = dataclasses.field(default_factory=lambda: defaultdict(float))
    unknown_custom_calls: int = 0
    unknown_loops: int = 0
    max_trips: int = 1
    by_source: dict[str, list[float]] = dataclasses.field(default_factory=lambda: defaultdict(lambda: [0.0, 0.0, 0.0]))
    conditional_flops: float = 0.0  # counted in `flops`: conditional branches, each as if taken
    dcn_bytes: float = 0.0          # counted in `collective_bytes`: collectives between hosts (GPU topologies)

    def add(self, other: Cost) -> None:
        """Adds `other`'s counts to these (a conditional's branch walked on its own)."""
        self.flops += other.flops
        self.bytes += other.bytes
        self.compute_seconds += other.compute_seconds
        for k, v in other.collective_bytes.items():
            self.collective_bytes[k] += v
        for k, v in other.collective_counts.items():
            self.collective_counts[k] += v
        self.unknown_custom_calls += other.unknown_custom_calls
        self.unknown_loops += other.unknown_loops
        self.max_trips = max(self.max_trips, other.max_trips)
        self.conditional_flops += other.conditional_flops
        self.dcn_bytes += other.dcn_bytes
        for k, v in other.by_source.items():
            row = self.by_source[k]
            for j in range(3):
                row[j] += v[j]

    def top(self, n: int = 12) -> list[dict]:
        """The `n` sources (JAX op names) of the most roofline time: FLOPs, bytes, seconds per step."""
        rows = sorted(self.by_source.items(), key=lambda kv: -kv[1][2])[:n]
        return [{"source": k, "flops": v[0], "bytes": v[1], "seconds": v[2]} for k, v in rows]


def _source(attrs: str) -> str:
    """An instruction's JAX origin: its `op_name` metadata without the jit/transform prefixes."""
    m = re.search(r'op_name="([^"]*)"', attrs)
    if not m:
        return "(no op name)"
    parts = [p for p in m.group(1).split("/") if not p.startswith(("jit(", "jvp(", "transpose(", "checkpoint", "remat"))]
    return "/".join(parts[-3:]) or m.group(1)


def analyse(hlo_text: str, chip: str, num_devices: int, devices_per_host: int = 0) -> Cost:
    """The per-device cost of one run of a compiled program (module docstring). `devices_per_host`:
    GPUs per host of a multi-host GPU topology (device i on host i // it); a collective whose replica
    groups span hosts is also counted in `Cost.dcn_bytes` (the network, not NVLink). 0: one network
    (a TPU slice's ICI)."""
    spec = CHIPS[chip]
    peak, bw, ici = spec["tflops"] * 1e12, spec["hbm_gbps"] * 1e9, spec["ici_gbps"] * 1e9
    comps, entry = parse(hlo_text)
    cost = Cost()

    def inner_flops(comp_name: str) -> float:
        comp = comps.get(comp_name)
        if comp is None:
            return 0.0
        types = comp.types()
        total = 0.0
        for i in comp.instrs:
            if i.op in ("dot", "convolution"):
                total += _dot_flops(i, types)
            elif i.op == "fusion" or i.op == "call":
                total += sum(inner_flops(c) for c in _callees(i).get("calls", []))
        return total

    def inner_collectives(comp_name: str, times: float):
        comp = comps.get(comp_name)
        if comp is None:
            return
        types = comp.types()
        for i in comp.instrs:
            kind = _collective(i.op)
            if kind:
                _count_collective(kind, i, types, times, comp_name)
            for c in _callees(i).get("calls", []):
                inner_collectives(c, times)

    def _count_collective(kind: str, i: Instr, types: dict[str, str], times: float, where: str):
        n = _group_size(i.attrs, num_devices)
        if n <= 1 and kind != "collective-permute":
            return
        if kind == "all-reduce" and where.startswith("all-reduce-scatter"):
            kind = "reduce-scatter"  # the TPU's fused all-reduce + slice is a reduce-scatter
        operand = sum(array_bytes(types.get(o, "")) for o in i.operands)
        result = array_bytes(i.type) if not i.op.endswith("-start") else operand
        if i.op.startswith("ragged-all-to-all"):  # rows into a worst-case buffer (or back out of it): the
            operand = min(array_bytes(types.get(i.operands[0], "")), result)  # smaller side is what moves
        frac = (n - 1) / n
        spans_hosts = devices_per_host and any(
            len(set(g // devices_per_host)) > 1 for g in replica_groups(i.attrs, num_devices))
        moved = {"all-gather": frac * (result if not i.op.endswith("-start") else operand * n),
                 "reduce-scatter": frac * operand, "all-reduce": 2 * frac * operand,
                 "all-to-all": frac * operand, "collective-permute": operand}[kind]
        cost.collective_bytes[kind] += moved * times
        cost.collective_counts[kind] += times
        if spans_hosts:
            cost.dcn_bytes += moved * times

    def walk(comp_name: str, times: float):
        nonlocal cost
        comp = comps[comp_name]
        types = comp.types()
        by_name = {i.name: i for i in comp.instrs}
        for i in comp.instrs:
            callees = _callees(i)
            if i.op == "while":
                trips = trip_count(comps, i, by_name)
                if trips is None:
                    cost.unknown_loops += 1
                    trips = 1
                cost.max_trips = max(cost.max_trips, trips)
                walk(callees["body"][0], times * trips)
                continue
            if i.op == "conditional":  # the branch of most roofline time, as if it were taken (XLA's rule)
                outer, branches = cost, []
                for c in callees.get("branch_computations", callees.get("calls", [])):
                    cost = Cost()
                    walk(c, times)
                    branches.append(cost)
                cost = outer
                if branches:
                    cost.add(max(branches, key=lambda x: x.compute_seconds + sum(x.collective_bytes.values()) / ici))
                    cost.conditional_flops += max(b.flops for b in branches)
                continue
            if i.op == "call":
                for key in ("calls", "to_apply"):
                    for c in callees.get(key, []):
                        walk(c, times)
                continue
            kind = _collective(i.op)
            if kind:
                _count_collective(kind, i, types, times, comp_name)
                continue
            if i.op in _FREE:
                continue
            flops = 0.0
            if i.op in ("dot", "convolution"):
                flops = _dot_flops(i, types)
            elif i.op == "fusion":
                flops = sum(inner_flops(c) for c in callees.get("calls", []))
                for c in callees.get("calls", []):
                    inner_collectives(c, times)
            elif i.op == "custom-call":
                est = re.search(r'"cost_estimate":\{"flops":"(\d+)"', i.attrs)
                target = re.search(r'custom_call_target="([^"]+)"', i.attrs)
                target = target.group(1) if target else ""
                if est:
                    flops = float(est.group(1)) * _active_rows(i.attrs)
                elif i.name.startswith("splash_mha"):
                    flops = _splash_flops(i, types)
                elif target.startswith(("__cudnn$", "__cublas$")):
                    flops = _gpu_custom_call_flops(i, types, target)
                    if flops is None:
                        cost.unknown_custom_calls += 1
                        flops = 0.0
                elif "tpu_custom_call" in i.attrs or target.startswith("__gpu$"):
                    cost.unknown_custom_calls += 1
            nbytes = _moved_bytes(i, types, comps)
            if i.op == "custom-call" and _active_rows(i.attrs) < 1:  # row blocks it skips are not read
                rows = sum(array_bytes(t) for t in [i.type, *(types.get(o, "") for o in i.operands)]
                           if len(_dims(t)) == 2)
                nbytes -= rows * (1 - _active_rows(i.attrs))
            cost.flops += flops * times
            cost.bytes += nbytes * times
            seconds = max(flops / peak, nbytes / bw) * times
            cost.compute_seconds += seconds
            row = cost.by_source[_source(i.attrs)]
            row[0] += flops * times
            row[1] += nbytes * times
            row[2] += seconds

    walk(entry, 1.0)
    return cost


def summary(cost: Cost, chip: str, compiler_cost: dict | None = None) -> dict:
    """The numbers `plan` reports, under stable keys (seconds per step, bytes per device)."""
    ici, dcn = CHIPS[chip]["ici_gbps"] * 1e9, CHIPS[chip].get("dcn_gbps", CHIPS[chip]["ici_gbps"]) * 1e9
    collective = sum(cost.collective_bytes.values())
    coll_seconds = (collective - cost.dcn_bytes) / ici + cost.dcn_bytes / dcn
    compiler_cost = compiler_cost or {}
    optimal = compiler_cost.get("optimal_seconds")
    compiler_valid = (optimal is not None and optimal > 0 and cost.max_trips <= 1 and not cost.unknown_custom_calls
                      and not cost.unknown_loops)
    return {
        "chip": chip,
        "flops_per_device": cost.flops,
        "hbm_bytes_per_device": cost.bytes,
        "collective_bytes_per_device": collective,
        "collective_bytes_by_kind": {k: cost.collective_bytes[k] for k in COLLECTIVES if k in cost.collective_bytes},
        "collective_count_by_kind": {k: cost.collective_counts[k] for k in COLLECTIVES if k in cost.collective_counts},
        "compute_seconds": cost.compute_seconds,
        "collective_seconds": coll_seconds,
        "seconds": cost.compute_seconds + coll_seconds,
        "seconds_overlapped": max(cost.compute_seconds, coll_seconds),
        "compiler_optimal_seconds": optimal,
        "compiler_flops": compiler_cost.get("flops"),
        "compiler_estimate_valid": compiler_valid,
        "loop_trips_max": cost.max_trips,
        "loops_of_unknown_trips": cost.unknown_loops,
        "custom_calls_of_unknown_cost": cost.unknown_custom_calls,
        "conditional_flops_per_device": cost.conditional_flops,
        "collective_bytes_between_hosts_per_device": cost.dcn_bytes,
        "top_sources": cost.top(),
    }


def compiler_cost(compiled) -> dict:
    """`compiled.cost_analysis()` as a plain dict (the first entry where a list comes back)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return {k: float(v) for k, v in (cost or {}).items() if k in ("flops", "bytes accessed", "optimal_seconds")}
