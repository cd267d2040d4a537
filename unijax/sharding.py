"""Meshes and logical-axis rules.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `vocab`, ...) in their `out_sharding`
metadata; one rules table maps each name onto mesh axes `data, fsdp, expert, tensor`, so a new kind
of parallelism changes the table, not the model. Batches are split over `data`, `fsdp` and
`expert` together (outside TA-MoE layers the expert axis is data parallelism; inside, tokens move to
their experts' devices). Every mesh size defaults to 1, so the same code runs on one CPU and on a pod.

Activations carry MaxText's `activation_*` names in the same table: `constrain(x, axes)` pins an
activation to them under the context mesh (`jax.set_mesh`), so the partitioner never has to guess
from the weights (an fsdp mesh shards the weights' `embed` axis, which XLA may otherwise copy onto
the residual stream instead of splitting its batch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("mlp", "tensor"),
    ("vision_mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vision_heads", "tensor"),
    ("vocab", "tensor"),
    ("experts", "expert"),
    ("codebook", None),
    ("embed_in", None),
    ("embed_out", None),
    ("conv_in", None),
    ("conv_out", None),
    ("layers", None),
    # activations: rows over the batch axes; the residual stream's embed replicated (the tensor
    # axis splits heads, the FFN's inner dim and the vocab, Megatron-style)
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)

RESIDUAL = ("activation_batch", "activation_length", "activation_embed")  # `[batch, seq, embed]`


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves `mesh.{data,fsdp,expert,tensor}` (one of them may be -1: all remaining devices). With
    `mesh.fit`, each fixed size becomes its gcd with the devices left (data, fsdp, expert, tensor in
    turn) and the -1 axis (else `data`) takes the rest: a recipe's `fsdp=8` is 8 on a node of 8 and 2
    on 2 devices."""
    sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
    auto = [a for a, s in sizes.items() if s == -1]
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise ValueError(f"mesh.{bad[0]}={sizes[bad[0]]}: mesh sizes are positive (or -1 for 'the rest')")
    if len(auto) > 1:
        raise ValueError(f"mesh.{auto[0]} and mesh.{auto[1]} are both -1; at most one mesh axis can be -1")
    if mesh_cfg.get("fit", False):
        left = num_devices
        for a in MESH_AXES:
            if sizes[a] != -1:
                sizes[a] = math.gcd(sizes[a], left)
                left //= sizes[a]
        sizes[auto[0] if auto else "data"] = left * (1 if auto else sizes["data"])
        return sizes
    fixed = math.prod(s for s in sizes.values() if s != -1)
    given = ", ".join(f"mesh.{a}={s}" for a, s in sizes.items() if s > 1)
    big = max((a for a in MESH_AXES if sizes[a] > 1), key=lambda a: sizes[a], default="fsdp")
    hint = f"; set sizes whose product divides them (e.g. --config.mesh.{big}=1) or --config.mesh.fit=True"
    if auto:
        if num_devices % fixed:
            raise ValueError(f"mesh.{auto[0]}=-1: the other mesh axes ({given}: {fixed} devices) do not divide the "
                             f"{num_devices} devices present{hint}")
        sizes[auto[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        desc = ", ".join(f"mesh.{a}={s}" for a, s in sizes.items())
        raise ValueError(f"{desc} needs {math.prod(sizes.values())} devices but {num_devices} are present; "
                         f"set one mesh axis to -1 or change the sizes (or --config.mesh.fit=True)")
    return sizes


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh | AbstractMesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> P:
    """Logical axis names of one array -> PartitionSpec. A mesh axis is used at most once per array,
    and a dimension its mesh axes do not divide stays replicated (tiny models on big meshes); a mesh
    axis the mesh does not have counts as size 1."""
    table = dict(rules)
    if axes is None:
        return P()
    used: set[str] = set()
    out = []
    for name, dim in zip(axes, shape):
        target = table.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape.get(a, 1) > 1)
        if mesh_axes and dim % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
            used.update(mesh_axes)
            out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            out.append(None)
    return P(*out)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
    """NamedShardings for every Variable of an (abstract) nnx.State, as a State of the same structure."""
    def one(v):
        axes = v.get_metadata().get("out_sharding")
        return NamedSharding(mesh, logical_to_spec(axes, v.shape, mesh, rules))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
    """`x` pinned to the sharding its logical `axes` (e.g. `RESIDUAL`) get from `rules` on the context
    mesh (`jax.set_mesh`); `x` itself without one (single-device inference, tests)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh, rules))


def target_platform() -> str:
    """The platform the code is traced for: the context mesh's devices (`jax.set_mesh`; a TPU
    topology's when `python -m unijax.plan --topology` compiles on a CPU host), else the default
    backend. Kernel choices (`model.attention_impl=auto`, `moe.impl=auto`) read it."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def num_batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(key: str, batch_size: int, mesh: Mesh) -> None:
    """A global batch (config key `key`) must split evenly over the batch axes and the processes."""
    n = num_batch_shards(mesh)
    if int(batch_size) % n:
        raise ValueError(f"{key}={batch_size} is not divisible by mesh.data x mesh.fsdp x mesh.expert = {n}")
    if int(batch_size) % jax.process_count():
        raise ValueError(f"{key}={batch_size} is not divisible by the {jax.process_count()} processes")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over `data` x `fsdp` x `expert`, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of a global batch -> global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
