"""Analysis of a trained model checkpoint: `python -m unijax.analyze <command> --ckpt CKPT [...]`.

    python -m unijax.analyze experts --ckpt workdir/ta_moe/model [--out DIR] [--num_batches N]
        [--batch_size B] [--seed S] [--data_dir D]

    python -m unijax.analyze intensity --ckpt CKPT --task und|gen [--samples 100] [--out curve.json]
        [--targets janus_pro|emu3|official|FILE] [--include_bos 1] [--und_queries answer|after_image]

    python -m unijax.analyze curves --workdir workdir/base [--out DIR]

`curves`: a run's held-out learning curves from its `metrics.jsonl` (accuracy per question kind
against the image-blind answerer, image-code loss against the prompt-blind generator), as
`DIR/curves.json`, `DIR/curves.png` and a printed table.

`intensity`: the per-layer cross-modal attention intensity (`unijax.training.aia`) of any
checkpoint unijax loads, over `--samples` held-out shapes samples of each task (prompts never
blanked). Writes the chosen task's mean curve with its standard deviation over samples
(`{"task", "layers", "mean", "std", "samples", ...}`, usable directly as `aia.und_targets` /
`aia.gen_targets`) to `--out` (default `<CKPT>/../analysis/intensity_<task>.json`), a PNG beside
it (same name, `.png`) with both tasks' curves against the `--targets` bands (the paper's
Figure 1 style), and prints the table (the paper's Table 1: mean and std per layer).

`experts` (TA-MoE checkpoints only): task-router accuracy and confidence, expert loads per group
and token task, dropped assignments and the shared-expert alpha of every TA-MoE layer
(`unijax.analysis.experts.expert_stats`), on held-out shapes batches of both tasks: the batches
the `shapes_heldout` evaluator evaluates (scene seed `S + HELD_OUT_SEED_OFFSET`, which the
training stream of seed S never uses). Writes `DIR/experts.json` and `DIR/experts.png` (each
replaced atomically, both only once both are complete) and prints a table.

Defaults come from the run that wrote the checkpoint: `<CKPT>/../config.json` (the training
config `unijax.training.loop` writes into its workdir; `unijax.training.config.defaults` where it is
missing): `--seed` = its `seed`, `--batch_size` = `train.batch_size`, `--num_batches` =
`train.eval_batches`, `--data_dir` (where the shapes tokenizer is cached) = `data.dir`, and the
data mix and layout (`data.*`; a task the run left out gets ratio 1: routing statistics need
both tasks). `--out` defaults to `<CKPT>/../analysis` (for `workdir/ta_moe/model`:
`workdir/ta_moe/analysis`).

Evaluation runs on one device without a mesh: the `capacity` dispatch then uses one dispatch
group for the whole batch, so `dropped_frac` can differ slightly from training on a data mesh.
"""

from __future__ import annotations

import argparse
import inspect

from unijax.analysis.commands import conflict, curves, experts, intensity
from unijax.cli import run_argparse

COMMANDS = ("experts", "intensity", "conflict", "curves")


def _defaults(fn) -> dict:
    """`fn`'s keyword defaults: the CLI's defaults are the analysis functions' own (shown by `%(default)s`)."""
    return {k: v.default for k, v in inspect.signature(fn).parameters.items() if v.default is not inspect.Parameter.empty}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m unijax.analyze", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    e = sub.add_parser("experts", help="TA-MoE router accuracy and expert loads on held-out shapes batches")
    e.add_argument("--ckpt", required=True, help="unijax model checkpoint directory (e.g. workdir/ta_moe/model)")
    e.add_argument("--out", default=None, help="output directory (default: <ckpt>/../analysis)")
    e.add_argument("--num_batches", type=int, default=None, help="default: the run's train.eval_batches")
    e.add_argument("--batch_size", type=int, default=None, help="default: the run's train.batch_size")
    e.add_argument("--seed", type=int, default=None,
                   help="training seed S; the held-out scenes use S + 1000003 (default: the run's seed)")
    e.add_argument("--data_dir", default=None, help="shapes tokenizer cache (default: the run's data.dir)")
    e.set_defaults(run=experts, **_defaults(experts))
    i = sub.add_parser("intensity", help="per-layer cross-modal attention intensity curves (AIA targets)")
    i.add_argument("--ckpt", required=True, help="unijax model checkpoint directory")
    i.add_argument("--task", required=True, choices=("und", "gen"), help="the curve written to --out")
    i.add_argument("--samples", type=int, help="held-out samples per task (default %(default)s)")
    i.add_argument("--out", default=None, help="curve JSON (default: <ckpt>/../analysis/intensity_<task>.json)")
    i.add_argument("--targets", help="bands drawn in the plot: a table name or a curve file (default %(default)s)")
    i.add_argument("--curve_delta", type=float, help="band half-width for curve-file targets (default %(default)s)")
    i.add_argument("--include_bos", type=int, help="T2I keys include BOS (default %(default)s, official)")
    i.add_argument("--und_queries", choices=("answer", "after_image"),
                   help="UND query tokens: the answer, or every token after the image (default %(default)s)")
    i.add_argument("--batch_size", type=int, default=None, help="default: the run's train.batch_size")
    i.add_argument("--seed", type=int, default=None, help="training seed S (default: the run's seed)")
    i.add_argument("--data_dir", default=None, help="shapes tokenizer cache (default: the run's data.dir)")
    i.set_defaults(run=intensity, **_defaults(intensity))
    c = sub.add_parser("conflict", help="cosines between the MMU and T2I loss gradients per layer and group")
    c.add_argument("--ckpt", required=True, help="unijax model checkpoint directory")
    c.add_argument("--num_batches", type=int, help="held-out batches of each task (default %(default)s)")
    c.add_argument("--out", default=None, help="output directory (default: <ckpt>/../analysis)")
    c.add_argument("--batch_size", type=int, default=None, help="default: the run's train.batch_size")
    c.add_argument("--seed", type=int, default=None, help="training seed S (default: the run's seed)")
    c.add_argument("--data_dir", default=None, help="shapes tokenizer cache (default: the run's data.dir)")
    c.set_defaults(run=conflict, **_defaults(conflict))
    k = sub.add_parser("curves", help="a run's held-out learning curves (per question kind, against the blind baselines)")
    k.add_argument("--workdir", required=True, help="a training run's workdir (its metrics.jsonl)")
    k.add_argument("--out", default=None, help="output directory (default: <workdir>/analysis)")
    k.set_defaults(run=curves, **_defaults(curves))
    return p


def main(argv=None):
    """Parses `argv` (default: sys.argv[1:]) and runs the command; returns its result."""
    args = parser().parse_args(argv)
    for key in ("num_batches", "batch_size"):
        if getattr(args, key, None) is not None and getattr(args, key) <= 0:
            raise ValueError(f"--{key}={getattr(args, key)} must be positive")
    return args.run(**{k: v for k, v in vars(args).items() if k not in ("command", "run")})


if __name__ == "__main__":
    run_argparse(main)
