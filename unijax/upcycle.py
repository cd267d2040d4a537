"""Upcycling CLI: a dense checkpoint (and the stage-1 per-task ones) -> a TA-MoE checkpoint.

    python -m unijax.upcycle --base workdir/base/model --und workdir/stage1_und/model \\
        --gen workdir/stage1_gen/model --out workdir/upcycled --noise 0.01

See `unijax.training.upcycle.upcycle_checkpoint`.
"""

from __future__ import annotations

from absl import app, flags

from unijax import cli
from unijax.models.config import MoEConfig
from unijax.training.upcycle import upcycle_checkpoint


def _define_flags():
    """Defined when run as a script only, so that importing this module adds no absl flags."""
    d = MoEConfig()
    flags.DEFINE_string("base", None, "dense unijax model checkpoint: everything outside the experts", required=True)
    flags.DEFINE_string("out", None, "output model checkpoint directory (must not exist unless --overwrite)",
                        required=True)
    flags.DEFINE_string("und", None, "dense checkpoint whose FFNs become the MMU experts (default: --base)")
    flags.DEFINE_string("gen", None, "dense checkpoint whose FFNs become the T2I experts (default: --base)")
    flags.DEFINE_float("noise", 0.0, "relative scale of the multiplicative Gaussian noise on each expert copy")
    flags.DEFINE_float("router_std", 1e-3, "std of the task-router and router kernels (0: uniform routing)")
    flags.DEFINE_integer("seed", 0, "seed of the noise and the routers")
    flags.DEFINE_bool("overwrite", False, "replace an existing --out")
    flags.DEFINE_integer("num_experts_per_group", d.num_experts_per_group, "moe.num_experts_per_group")
    flags.DEFINE_integer("num_shared_experts", d.num_shared_experts, "moe.num_shared_experts")
    flags.DEFINE_integer("top_k", d.top_k, "moe.top_k")
    flags.DEFINE_integer("expert_intermediate_size", d.expert_intermediate_size,
                         "moe.expert_intermediate_size (0 or the dense intermediate size)")
    flags.DEFINE_enum("group_assignment", d.group_assignment, ["label", "router", "soft"], "moe.group_assignment")
    flags.DEFINE_enum("impl", d.impl, ["auto", "dropless", "capacity"], "moe.impl")
    flags.DEFINE_float("capacity_factor", d.capacity_factor, "moe.capacity_factor")
    flags.DEFINE_float("alpha_init", d.alpha_init, "moe.alpha_init (0: the upcycled model equals und/gen)")
    flags.DEFINE_list("layers", [], "moe.layers: decoder layers to upcycle (comma separated); empty = all")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    try:
        layers = tuple(int(i) for i in f.layers)
    except ValueError:
        raise app.UsageError(f"--layers={','.join(f.layers)} must be comma-separated integers") from None
    moe = MoEConfig(num_experts_per_group=f.num_experts_per_group, num_shared_experts=f.num_shared_experts,
                    top_k=f.top_k, expert_intermediate_size=f.expert_intermediate_size,
                    group_assignment=f.group_assignment, impl=f.impl, capacity_factor=f.capacity_factor,
                    alpha_init=f.alpha_init, layers=layers)
    upcycle_checkpoint(f.base, f.out, f.und, f.gen, moe, noise=f.noise, router_std=f.router_std, seed=f.seed,
                       overwrite=f.overwrite)


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
