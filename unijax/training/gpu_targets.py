"""Compile-only NVIDIA GPUs for `python -m unijax.plan --topology h100:2x8` on a host without a GPU.

jax's CUDA plugin (`jax-cuda12-plugin` + `jax-cuda12-pjrt`, 0.10.2) builds a GPU topology from a
`GpuTargetConfigProto` (text format) in place of a live device, and a `<slices>x<hosts>x<devices
per host>` shape; XLA's GPU compiler then compiles for it without a device (no autotuning: GEMM tiles
and cuDNN plans are defaults). The configs below are the `gpu_device_info` of XLA's
`xla/backends/gpu/target_config/specs/h100_sxm.txtpb`, reduced to its basic fields; the H200 differs
in memory size and bandwidth only. `trace-time` cuDNN checks (`attention_impl=auto` picks cuDNN's
fused attention on GPU) ask the local libcudnn for its version, so the cuDNN wheel must be installed
too. The plugin prints a traceback at every `import jax` on a host without CUDA unless
`JAX_PLATFORMS=cpu`: install it in an environment of its own (docs/gpu.md).
"""

from __future__ import annotations

import re

from jax.experimental import topologies

_DEVICE_INFO = """
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
device_description_str: "{name}"
"""

TARGET_CONFIGS = {
    "h100": _DEVICE_INFO.format(bandwidth=3352320000000, memory=84942979072, name="NVIDIA H100 80GB HBM3"),
    "h200": _DEVICE_INFO.format(bandwidth=4800000000000, memory=150754820096, name="NVIDIA H200"),
}

INSTALL = ("pip install --no-deps jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2 nvidia-cudnn-cu12==9.28.0.42 "
           "in an environment of its own, run with JAX_PLATFORMS=cpu (docs/gpu.md)")


def parse(name: str) -> tuple[str, int, int]:
    """`h100:2x8` -> ("h100", 2 hosts, 8 GPUs each); `h100:8` -> ("h100", 1, 8)."""
    kind, _, shape = name.lower().partition(":")
    m = re.fullmatch(r"(?:(\d+)x)?(\d+)", shape)
    if kind not in TARGET_CONFIGS or not m or int(m.group(2)) < 1 or int(m.group(1) or 1) < 1:
        raise ValueError(f"--topology={name!r}: a GPU topology is <gpu>:<hosts>x<gpus per host> (or <gpu>:<gpus>) "
                         f"with gpu among {sorted(TARGET_CONFIGS)}, e.g. h100:8 or h100:4x8")
    return kind, int(m.group(1) or 1), int(m.group(2))


def devices(name: str) -> list:
    """The compile-only devices of GPU topology `name` (`parse`), host-major: device i is on host
    i // gpus per host."""
    kind, hosts, per_host = parse(name)
    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=TARGET_CONFIGS[kind],
                                            topology=f"1x{hosts}x{per_host}")
    except Exception as e:  # no CUDA plugin, or the plugin refused
        raise ValueError(f"--topology={name!r}: no GPU topology ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}); the CUDA plugin needs: {INSTALL}") from None
    return sorted(topo.devices, key=lambda d: d.id)
