"""Analysis of a trained model checkpoint: `python -m unijax.analyze <command> --ckpt CKPT [...]`.

    python -m unijax.analyze experts --ckpt workdir/ta_moe/model [--out DIR] [--num_batches N]
        [--batch_size B] [--seed S] [--data_dir D]

    python -m unijax.analyze intensity --ckpt CKPT --task und|gen [--samples 100] [--out curve.json]
        [--targets janus_pro|emu3|official|FILE] [--include_bos 1] [--und_queries answer|after_image]

`intensity`: the per-layer cross-modal attention intensity (`unijax.training.aia`) of any
checkpoint unijax loads, over `--samples` held-out shapes samples of each task (prompts never
blanked). Writes the chosen task's mean curve with its standard deviation over samples
(`{"task", "layers", "mean", "std", "samples", ...}`, usable directly as `aia.und_targets` /
`aia.gen_targets`) to `--out` (default `<CKPT>/../analysis/intensity_<task>.json`), a PNG beside
it (same name, `.png`) with both tasks' curves against the `--targets` bands (the paper's
Figure 1 style), and prints the table (the paper's Table 1: mean and std per layer).

`experts` (TA-MoE checkpoints only): task-router accuracy and confidence, expert loads per group
and token task, dropped assignments and the shared-expert alpha of every TA-MoE layer
(`unijax.inference.experts.expert_stats`), on held-out shapes batches of both tasks: the batches
`training.steps.Evaluator` evaluates (scene seed `S + Evaluator.EVAL_SEED_OFFSET`, which the
training stream of seed S never uses). Writes `DIR/experts.json` and `DIR/experts.png` (each
replaced atomically, both only once both are complete) and prints a table.

Defaults come from the run that wrote the checkpoint: `<CKPT>/../config.json` (the training
config `unijax.training.loop` writes into its workdir; `configs/common.py` values where it is
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
import json
import pathlib
import sys

import ml_collections
import numpy as np

COMMANDS = ("experts", "intensity", "conflict")


# -- the run's config and held-out data -----------------------------------------------------------
def _common_config() -> ml_collections.ConfigDict:
    from unijax.reproduce import load_config

    return load_config("common", "tiny")


def run_config(ckpt) -> tuple[ml_collections.ConfigDict, pathlib.Path | None]:
    """(training config of the run that wrote `ckpt`, the config.json it came from or None):
    `configs/common.py` defaults with `seed`, `data.*`, `train.batch_size` and `train.eval_batches`
    from `<ckpt>/../config.json` when it exists."""
    c = _common_config()
    path = pathlib.Path(ckpt).absolute().parent / "config.json"
    if not path.is_file():
        return c, None
    try:
        saved = json.loads(path.read_text())
        c.seed = int(saved.get("seed", c.seed))
        c.data.update({k: v for k, v in saved.get("data", {}).items() if k in c.data})
        c.train.update({k: v for k, v in saved.get("train", {}).items() if k in ("batch_size", "eval_batches")})
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{path}: not a readable unijax training config ({e}); move it away to use the "
                         f"configs/common.py defaults") from e
    return c, path


def heldout_batches(cfg, config, num_batches: int, batch_size: int, seed: int, data_dir: str,
                    only: str | None = None):
    """(held-out shapes batches of both tasks, images_per_row, scene seed): `steps.Evaluator`'s
    batches for a run with `seed`, `train.batch_size = batch_size`, `train.eval_batches =
    num_batches`. The run's task mix is kept, except that a task it left out (ratio 0) gets ratio 1:
    routing statistics need tokens of both tasks. `only="und"` / `"gen"`: batches of that task alone."""
    from unijax.data import pipeline, shapes
    from unijax.data.tokenizer import check_compatible, load_tokenizer
    from unijax.training import steps

    config = ml_collections.ConfigDict(config.to_dict())
    config.objective = "lm"
    config.seed = seed
    config.data.source = "shapes"
    config.data.dir = data_dir
    config.train.batch_size = batch_size
    config.train.eval_batches = num_batches
    for key in ("und_ratio", "gen_ratio"):
        if not config.data[key] > 0:
            config.data[key] = 1.0
    if only is not None:
        config.data["gen_ratio" if only == "und" else "und_ratio"] = 0.0
    tokenizer = load_tokenizer(config.data.tokenizer, config.data.dir)
    check_compatible(tokenizer, cfg)
    layout = pipeline.Layout.from_model(cfg, config.data.max_len, config.data.cfg_drop_prob)
    batches = steps.heldout_batches(config, tokenizer, layout, tuple(shapes.KINDS))
    return batches, layout.images_per_row(False), seed + steps.Evaluator.EVAL_SEED_OFFSET


# -- outputs -----------------------------------------------------------------------------------------
def _fmt(v, width=7, digits=3) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.{digits}f}"


def experts_table(stats: dict) -> str:
    """One row per TA-MoE layer: router accuracy and p(own group), per-group load entropy (H / log N
    over all tokens, 1 = uniform) and largest expert share (uniform = 1/N), dropped, alpha."""
    n = stats["num_experts_per_group"]
    head = (f"{'layer':>5} {'acc_mmu':>7} {'acc_t2i':>7} {'acc_all':>7} {'p_mmu':>7} {'p_t2i':>7} "
            f"{'H_mmu':>7} {'max_mmu':>7} {'H_t2i':>7} {'max_t2i':>7} {'dropped':>7} {'alpha':>7}")
    lines = [f"TA-MoE experts: {n} per group, top-{stats['top_k']}, group_assignment={stats['group_assignment']}; "
             f"tokens mmu={stats['tokens']['mmu']} t2i={stats['tokens']['t2i']}; uniform load 1/N = {1 / n:.3f}",
             head]
    for r in stats["layers"]:
        acc, p, ent = r["router_acc"], r["router_prob"], r["load_entropy"]
        mx = {g: max(r["expert_load"][g]["all_tokens"]) for g in ("mmu_group", "t2i_group")}
        lines.append(f"{r['layer']:>5} {_fmt(acc['mmu'])} {_fmt(acc['t2i'])} {_fmt(acc['all'])} {_fmt(p['mmu'])} "
                     f"{_fmt(p['t2i'])} {_fmt(ent['mmu_group'])} {_fmt(mx['mmu_group'])} {_fmt(ent['t2i_group'])} "
                     f"{_fmt(mx['t2i_group'])} {_fmt(r['dropped_frac'], digits=4)} {_fmt(r['alpha'])}")
    return "\n".join(lines)


def plot_experts(stats: dict, path, title: str = "") -> None:
    """Writes a PNG: router accuracy per layer and task on top; below, one row per TA-MoE layer
    with the expert loads of the MMU group (left) and the T2I group (right), MMU tokens vs T2I
    tokens, and the uniform load 1/N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, n = stats["layers"], stats["num_experts_per_group"]
    layers = [r["layer"] for r in rows]
    fig = plt.figure(figsize=(10, 3.0 + 2.0 * len(rows)), layout="constrained")
    grid = fig.add_gridspec(1 + len(rows), 2, height_ratios=[1.5] + [1] * len(rows))
    ax = fig.add_subplot(grid[0, :])
    for key, style in (("mmu", "o-"), ("t2i", "s-"), ("all", "k--")):
        acc = [np.nan if r["router_acc"][key] is None else r["router_acc"][key] for r in rows]
        ax.plot(layers, acc, style, label=f"{key} tokens")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(layers)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("task-router accuracy")
    ax.set_title(title or "TA-MoE task router")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    x = np.arange(n)
    for i, r in enumerate(rows):
        for g, group in enumerate(("mmu", "t2i")):
            ax = fig.add_subplot(grid[1 + i, g])
            cell = r["expert_load"][f"{group}_group"]
            ax.bar(x - 0.2, cell["mmu_tokens"], 0.4, label="MMU tokens")
            ax.bar(x + 0.2, cell["t2i_tokens"], 0.4, label="T2I tokens")
            ax.axhline(1 / n, color="k", ls="--", lw=0.8, label="uniform 1/N")
            top = max([1 / n, *cell["mmu_tokens"], *cell["t2i_tokens"]])
            ax.set_ylim(0, min(1.05, 1.2 * top))
            ax.set_xticks(x)
            got = [r["group_share"][f"{t}_tokens"][f"{group}_group"] for t in ("mmu", "t2i")]
            got = "/".join("-" if v is None else f"{v:.0%}" for v in got)
            ax.set_title(f"layer {r['layer']}: {group.upper()} experts (get {got} of MMU/T2I slots)", fontsize=9)
            if g == 0:
                ax.set_ylabel("load share")
            if i == len(rows) - 1:
                ax.set_xlabel("expert (within group)")
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8)
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)


def _emit(out: pathlib.Path, stem: str, result: dict, plot, table: str) -> dict:
    """`out/<stem>.json` and `out/<stem>.png` (by `plot(path)`), replaced together; prints the table."""
    from unijax.checkpoints import write_outputs

    write_outputs(out, {f"{stem}.json": lambda p: p.write_text(json.dumps(result, indent=2) + "\n"),
                        f"{stem}.png": plot})
    print(table)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    return result


# -- commands ------------------------------------------------------------------------------------------
def experts(args) -> dict:
    from unijax import checkpoints
    from unijax.inference.experts import expert_stats

    ckpt = pathlib.Path(args.ckpt)
    cfg = checkpoints.read_config(ckpt)
    if cfg.ffn != "ta_moe":
        raise ValueError(f"{ckpt} is a dense checkpoint ({ckpt / 'model.json'}: ffn={cfg.ffn!r}): it has no experts "
                         f"to analyse. `analyze experts` needs a TA-MoE model (ffn='ta_moe'), e.g. the "
                         f"workdir/ta_moe/model written by `python -m unijax.train --config configs/ta_moe.py`")
    config, config_path = run_config(ckpt)
    seed = config.seed if args.seed is None else args.seed
    batch_size = args.batch_size or config.train.batch_size
    num_batches = args.num_batches or config.train.eval_batches
    data_dir = args.data_dir or config.data.dir
    out = pathlib.Path(args.out) if args.out else ckpt.absolute().parent / "analysis"
    if config_path is None:
        print(f"no {ckpt.absolute().parent / 'config.json'}: data settings from configs/common.py")
    batches, images_per_row, data_seed = heldout_batches(cfg, config, num_batches, batch_size, seed, data_dir)
    model = checkpoints.load_model(ckpt)
    stats = expert_stats(model, batches, images_per_row)
    stats = {"checkpoint": str(ckpt.absolute()), "run_config": str(config_path) if config_path else None,
             "seed": seed, "data_seed": data_seed, "num_batches": num_batches, "batch_size": batch_size, **stats}
    return _emit(out, "experts", stats, lambda p: plot_experts(stats, p, title=f"{ckpt}: TA-MoE task router"),
                 experts_table(stats))


def plot_intensity(curves: dict, targets: dict, path, title: str = "") -> None:
    """Both tasks' mean +- std curves over layers against their target bands (target +- delta)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), layout="constrained")
    colours = {"gen": "tab:red", "und": "tab:blue"}
    names = {"gen": "generation (image -> prompt)", "und": "understanding (answer -> image)"}
    for task, c in curves.items():
        mean, std = np.asarray(c["mean"]), np.asarray(c["std"])
        layers = np.arange(len(mean))
        ax.plot(layers, mean, "o-", color=colours[task], label=f"{names[task]}, n={c['samples']}")
        ax.fill_between(layers, mean - std, mean + std, color=colours[task], alpha=0.15)
        if task in targets:
            t, d = np.asarray(targets[task].target), np.asarray(targets[task].delta)
            ax.step(layers, t, where="mid", color=colours[task], ls="--", lw=1, label=f"{task} target (+- delta)")
            ax.fill_between(layers, t - d, t + d, step="mid", color=colours[task], alpha=0.07)
    ax.set_xlabel("layer")
    ax.set_ylabel("cross-modal attention intensity")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.savefig(path, format="png", dpi=90)
    plt.close(fig)


def intensity_table(curves: dict) -> str:
    lines = ["layer " + "".join(f"{t + ' mean':>10}{t + ' std':>9}" for t in curves)]
    n = len(next(iter(curves.values()))["mean"])
    for l in range(n):
        lines.append(f"{l:5d} " + "".join(f"{c['mean'][l]:10.4f}{c['std'][l]:9.4f}" for c in curves.values()))
    lines.append("mean  " + "".join(f"{np.mean(c['mean']):10.4f}{'':9}" for c in curves.values()))
    return "\n".join(lines)


def intensity(args) -> dict:
    import math

    from unijax import checkpoints
    from unijax.inference.intensity import intensity_curves
    from unijax.training import aia

    if args.task not in aia.TASKS:
        raise ValueError(f"--task={args.task!r}: expected und or gen")
    if args.samples <= 0:
        raise ValueError(f"--samples={args.samples} must be positive")
    ckpt = pathlib.Path(args.ckpt)
    cfg = checkpoints.read_config(ckpt)
    config, config_path = run_config(ckpt)
    config.data.cfg_drop_prob = 0.0  # the model's intensities on real prompts
    seed = config.seed if args.seed is None else args.seed
    batch_size = args.batch_size or config.train.batch_size
    num_batches = math.ceil(2.2 * args.samples / batch_size) + 1  # both tasks, 1:1 by default
    data_dir = args.data_dir or config.data.dir
    out = pathlib.Path(args.out) if args.out else ckpt.absolute().parent / "analysis" / f"intensity_{args.task}.json"
    targets = {t: aia.layer_targets(args.targets, t, cfg.text.num_layers, args.curve_delta)
               for t in aia.TASKS if args.targets in aia.TABLES or t == args.task}
    span_kw = {"include_bos": bool(args.include_bos), "und_queries": args.und_queries, "skip_cfg_blank": True}
    batches, images_per_row, data_seed = heldout_batches(cfg, config, num_batches, batch_size, seed, data_dir)
    model = checkpoints.load_model(ckpt)
    curves = intensity_curves(model, batches, images_per_row, samples=args.samples, **span_kw)
    for t, c in curves.items():
        if c["samples"] < args.samples:
            raise ValueError(f"only {c['samples']} valid {t} samples in {num_batches} held-out batches of "
                             f"{batch_size}; the run's data mix lacks that task")
    main_curve = curves[args.task]
    result = {"task": args.task, "layers": cfg.text.num_layers, "mean": main_curve["mean"].tolist(),
              "std": main_curve["std"].tolist(), "samples": main_curve["samples"], "checkpoint": str(ckpt.absolute()),
              "run_config": str(config_path) if config_path else None, "data_seed": data_seed, "spans": span_kw,
              "other": {t: {"mean": c["mean"].tolist(), "std": c["std"].tolist()}
                        for t, c in curves.items() if t != args.task}}
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    from unijax.checkpoints import write_outputs

    write_outputs(out.parent, {
        out.name: lambda p: p.write_text(json.dumps(result, indent=2) + "\n"),
        png.name: lambda p: plot_intensity(curves, targets, p, title=f"{ckpt}: cross-modal attention intensity"),
    })
    print(intensity_table(curves))
    print(f"wrote {out} and {png}")
    return result


def plot_conflict(stats: dict, path, title: str = "") -> None:
    """Per-layer gradient cosines of each decoder group (top) and the model-level groups (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layer_rows = [g for g in stats["groups"] if g["scope"].startswith("layer")]
    model_rows = [g for g in stats["groups"] if g["scope"] == "model" and g["cosine"] is not None]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), layout="constrained")
    for group in dict.fromkeys(g["group"] for g in layer_rows):
        pts = [(int(g["scope"][5:]), g["cosine"]) for g in layer_rows if g["group"] == group and g["cosine"] is not None]
        if pts:
            xs, ys = zip(*pts)
            top.plot(xs, ys, marker="o", label=group, lw=2.5 if group == "all" else 1.2)
    top.axhline(0, color="k", lw=0.8)
    top.set_xticks(sorted({int(g["scope"][5:]) for g in layer_rows}))
    top.set_xlabel("decoder layer")
    top.set_ylabel("cos(g_MMU, g_T2I)")
    top.legend(fontsize=8, ncol=3)
    bottom.bar([g["group"] for g in model_rows], [g["cosine"] for g in model_rows],
               color=["tab:red" if g["cosine"] < 0 else "tab:blue" for g in model_rows])
    bottom.axhline(0, color="k", lw=0.8)
    bottom.set_ylabel("cos (model-level groups)")
    bottom.tick_params(axis="x", labelsize=8, rotation=20)
    fig.suptitle(title or "gradient conflict", fontsize=9)
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)


def conflict_table(stats: dict) -> str:
    lines = [f"{'scope':8} {'group':14} {'cosine':>8} {'batch mean':>11} {'batch std':>10} {'|g_mmu|':>9} "
             f"{'|g_t2i|':>9}"]
    for g in stats["groups"]:
        lines.append(f"{g['scope']:8} {g['group']:14} {_fmt(g['cosine'], 8)} {_fmt(g['batch_cosine_mean'], 11)} "
                     f"{_fmt(g['batch_cosine_std'], 10)} {g['norm_mmu']:9.2e} {g['norm_t2i']:9.2e}")
    return "\n".join(lines)


def conflict(args) -> dict:
    from unijax import checkpoints
    from unijax.inference.conflict import conflict_stats

    ckpt = pathlib.Path(args.ckpt)
    cfg = checkpoints.read_config(ckpt)
    config, config_path = run_config(ckpt)
    config.data.cfg_drop_prob = 0.0
    seed = config.seed if args.seed is None else args.seed
    batch_size = args.batch_size or config.train.batch_size
    data_dir = args.data_dir or config.data.dir
    out = pathlib.Path(args.out) if args.out else ckpt.absolute().parent / "analysis"
    und, images_per_row, data_seed = heldout_batches(cfg, config, args.num_batches, batch_size, seed, data_dir, "und")
    gen, _, _ = heldout_batches(cfg, config, args.num_batches, batch_size, seed, data_dir, "gen")
    from unijax.data import pipeline

    keep = lambda b: {k: b[k] for k in pipeline.BATCH_KEYS}  # noqa: E731
    model = checkpoints.load_model(ckpt)
    stats = conflict_stats(model, map(keep, und), map(keep, gen), images_per_row)
    stats = {"checkpoint": str(ckpt.absolute()), "run_config": str(config_path) if config_path else None,
             "ffn": cfg.ffn, "data_seed": data_seed, "batch_size": batch_size, **stats}
    return _emit(out, "conflict", stats,
                 lambda p: plot_conflict(stats, p, title=f"{ckpt} ({cfg.ffn}): MMU vs T2I gradients"),
                 conflict_table(stats))


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
    e.set_defaults(run=experts)
    i = sub.add_parser("intensity", help="per-layer cross-modal attention intensity curves (AIA targets)")
    i.add_argument("--ckpt", required=True, help="unijax model checkpoint directory")
    i.add_argument("--task", required=True, choices=("und", "gen"), help="the curve written to --out")
    i.add_argument("--samples", type=int, default=100, help="held-out samples per task (default 100)")
    i.add_argument("--out", default=None, help="curve JSON (default: <ckpt>/../analysis/intensity_<task>.json)")
    i.add_argument("--targets", default="janus_pro", help="bands drawn in the plot: a table name or a curve file")
    i.add_argument("--curve_delta", type=float, default=0.05, help="band half-width for curve-file targets")
    i.add_argument("--include_bos", type=int, default=1, help="T2I keys include BOS (default 1, official)")
    i.add_argument("--und_queries", default="answer", choices=("answer", "after_image"))
    i.add_argument("--batch_size", type=int, default=None, help="default: the run's train.batch_size")
    i.add_argument("--seed", type=int, default=None, help="training seed S (default: the run's seed)")
    i.add_argument("--data_dir", default=None, help="shapes tokenizer cache (default: the run's data.dir)")
    i.set_defaults(run=intensity)
    c = sub.add_parser("conflict", help="cosines between the MMU and T2I loss gradients per layer and group")
    c.add_argument("--ckpt", required=True, help="unijax model checkpoint directory")
    c.add_argument("--num_batches", type=int, default=8, help="held-out batches of each task (default 8)")
    c.add_argument("--out", default=None, help="output directory (default: <ckpt>/../analysis)")
    c.add_argument("--batch_size", type=int, default=None, help="default: the run's train.batch_size")
    c.add_argument("--seed", type=int, default=None, help="training seed S (default: the run's seed)")
    c.add_argument("--data_dir", default=None, help="shapes tokenizer cache (default: the run's data.dir)")
    c.set_defaults(run=conflict)
    return p


def main(argv=None):
    """Parses `argv` (default: sys.argv[1:]) and runs the command; returns its result."""
    args = parser().parse_args(argv)
    for key in ("num_batches", "batch_size"):
        if getattr(args, key, None) is not None and getattr(args, key) <= 0:
            raise ValueError(f"--{key}={getattr(args, key)} must be positive")
    return args.run(args)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
