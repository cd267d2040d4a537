"""The UniDecouple experiments end to end on the shapes world: `python -m unijax.reproduce --out DIR`.

    bash launch/reproduce_shapes.sh [--quick] [--out workdir/reproduce] [--seeds 0,1,2] [--base_from workdir/base]

Stages (each the documented command, run in-process; a finished stage is skipped on rerun, an
interrupted one resumes from its checkpoints):
  1. stage 0: the language stage (`configs/stage0_lm.py`: the decoder on scenes in words), then the
     VQ tokenizer from it (`configs/stage0_vq.py`);
  2. the dense base (`configs/base.py`, `init_from` the stage-0 model): shared by every seed. Stage 0
     and the base run at their configs' own budgets, so they are what `python -m unijax.train --config
     configs/base.py` builds; `--base_from WORKDIR` copies such a finished run in instead (its configs
     are checked against the plan's, key by key);
  then per seed, each from the base with the same step budget:
  3. the paper's TOC validation: understanding only, generation only, both (`configs/base.py` with
     `data.gen_ratio=0` / `data.und_ratio=0` / neither);
  4. stage 1 on each task (`configs/stage1_und.py`, `stage1_gen.py`), upcycling, stage 2
     (`configs/stage2.py`);
  5. the AIA variants: dense + AIA (`configs/aia.py`) and TA-MoE + AIA (`configs/stage2.py:aia`);
  6. `unijax.evaluate`'s `shapes_pope`, `shapes_mc` and `shapes_geneval` on held-out scenes;
  7. `unijax.analyze intensity` (base, dense joint, dense + AIA, TA-MoE, TA-MoE + AIA) and `conflict`
     (dense joint vs TA-MoE) on every seed's models: `DIR/intensity.png`, `DIR/conflict.png`.
The report (`DIR/report.md`, and `report.json` with every number) holds the paper's two tables in
our terms: (a) Und. / Gen. / Both with deltas, (b) dense joint vs TA-MoE vs dense+AIA vs TA-MoE+AIA,
as mean +- std over seeds with the per-seed values, the commands, the timings and whether the
paper's claims hold here. `--quick` runs every stage with a few steps and small evaluation sets
(a smoke test of the pipeline; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys

from unijax.analysis import recipe
from unijax.cli import run_argparse


def main(argv=None) -> pathlib.Path:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m unijax.reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="workdir/reproduce")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the per-seed runs (>= 2 for spreads)")
    p.add_argument("--quick", action="store_true", help="a few steps per stage (a smoke test: minutes)")
    p.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming")
    p.add_argument("--base_from", default=None, type=pathlib.Path,
                   help="the workdir of a finished `python -m unijax.train --config configs/base.py`: its stage-0 "
                        "models and base are copied in instead of trained (checked to be the same configs)")
    p.add_argument("--family", default="janus", choices=("janus", "emu3"),
                   help="the architecture every stage trains (emu3: the tiny Emu3-style model)")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds:
        p.error("--seeds: at least one seed")
    b = recipe.QUICK if args.quick else recipe.FULL
    out = pathlib.Path(args.out).absolute()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    return recipe.run(out, seeds, b, args.family, args.quick, argv, args.base_from)


if __name__ == "__main__":
    run_argparse(main)
