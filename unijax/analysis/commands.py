"""The analyses of `python -m unijax.analyze`: `experts`, `intensity` and `conflict` on a checkpoint,
`curves` on a run's workdir (each returns its result and writes JSON + PNG atomically; usage in
`unijax.analyze`)."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np

from unijax import checkpoints, contract
from unijax.analysis.conflict import conflict_stats
from unijax.analysis.experts import expert_stats
from unijax.analysis.heldout import heldout_batches, run_config
from unijax.analysis.intensity import intensity_curves
from unijax.analysis.plots import plot_conflict, plot_curves, plot_experts, plot_intensity
from unijax.io import write_outputs
from unijax.models import forward
from unijax.training import aia


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


def _emit(out: pathlib.Path, stem: str, result: dict, plot, table: str) -> dict:
    """`out/<stem>.json` and `out/<stem>.png` (by `plot(path)`), replaced together; prints the table."""
    write_outputs(out, {f"{stem}.json": lambda p: p.write_text(json.dumps(result, indent=2) + "\n"),
                        f"{stem}.png": plot})
    print(table)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    return result


def experts(ckpt, *, out=None, num_batches=None, batch_size=None, seed=None, data_dir=None) -> dict:
    """Router accuracy and expert loads of a TA-MoE checkpoint (`python -m unijax.analyze experts`);
    None = the run's own value (its seed, train.eval_batches, train.batch_size, data.dir)."""
    ckpt = pathlib.Path(ckpt)
    cfg = checkpoints.read_config(ckpt)
    if cfg.ffn != "ta_moe":
        raise ValueError(f"{ckpt} is a dense checkpoint ({ckpt / 'model.json'}: ffn={cfg.ffn!r}): it has no experts "
                         f"to analyse. `analyze experts` needs a TA-MoE model (ffn='ta_moe'), e.g. the "
                         f"workdir/ta_moe/model written by `python -m unijax.train --config configs/ta_moe.py`")
    config, config_path = run_config(ckpt)
    seed = config.seed if seed is None else seed
    batch_size = batch_size or config.train.batch_size
    num_batches = num_batches or config.train.eval_batches
    data_dir = data_dir or config.data.dir
    out = pathlib.Path(out) if out else ckpt.absolute().parent / "analysis"
    if config_path is None:
        print(f"no {ckpt.absolute().parent / 'config.json'}: data settings from configs/common.py")
    batches, images_per_row, data_seed = heldout_batches(cfg, config, num_batches, batch_size, seed, data_dir)
    model = checkpoints.load_model(ckpt)
    stats = expert_stats(model, batches, images_per_row)
    stats = {"checkpoint": str(ckpt.absolute()), "run_config": str(config_path) if config_path else None,
             "seed": seed, "data_seed": data_seed, "num_batches": num_batches, "batch_size": batch_size, **stats}
    return _emit(out, "experts", stats, lambda p: plot_experts(stats, p, title=f"{ckpt}: TA-MoE task router"),
                 experts_table(stats))


def intensity_table(curves: dict) -> str:
    lines = ["layer " + "".join(f"{t + ' mean':>10}{t + ' std':>9}" for t in curves)]
    n = len(next(iter(curves.values()))["mean"])
    for l in range(n):
        lines.append(f"{l:5d} " + "".join(f"{c['mean'][l]:10.4f}{c['std'][l]:9.4f}" for c in curves.values()))
    lines.append("mean  " + "".join(f"{np.mean(c['mean']):10.4f}{'':9}" for c in curves.values()))
    return "\n".join(lines)


def intensity(ckpt, task, *, samples=100, out=None, targets="janus_pro", curve_delta=0.05, include_bos=1,
              und_queries="answer", batch_size=None, seed=None, data_dir=None) -> dict:
    """Per-layer cross-modal attention intensity of a checkpoint (`python -m unijax.analyze intensity`);
    None = the run's own value."""
    if task not in forward.AIA_TASKS:
        raise ValueError(f"--task={task!r}: expected und or gen")
    if samples <= 0:
        raise ValueError(f"--samples={samples} must be positive")
    ckpt = pathlib.Path(ckpt)
    cfg = checkpoints.read_config(ckpt)
    config, config_path = run_config(ckpt)
    config.data.cfg_drop_prob = 0.0  # the model's intensities on real prompts
    seed = config.seed if seed is None else seed
    batch_size = batch_size or config.train.batch_size
    num_batches = math.ceil(2.2 * samples / batch_size) + 1  # both tasks, 1:1 by default
    data_dir = data_dir or config.data.dir
    out = pathlib.Path(out) if out else ckpt.absolute().parent / "analysis" / f"intensity_{task}.json"
    bands = {t: aia.layer_targets(targets, t, cfg.text.num_layers, curve_delta)
             for t in forward.AIA_TASKS if targets in aia.TABLES or t == task}
    span_kw = {"include_bos": bool(include_bos), "und_queries": und_queries, "skip_cfg_blank": True}
    batches, images_per_row, data_seed = heldout_batches(cfg, config, num_batches, batch_size, seed, data_dir)
    model = checkpoints.load_model(ckpt)
    curves = intensity_curves(model, batches, images_per_row, samples=samples, **span_kw)
    for t, c in curves.items():
        if c["samples"] < samples and config.data.source == "files" and c["samples"] > 0:
            print(f"{t}: the held-out data holds {c['samples']} samples, fewer than --samples={samples}: "
                  f"using those (each once)")
        elif c["samples"] < samples:
            raise ValueError(f"only {c['samples']} valid {t} samples in {num_batches} held-out batches of "
                             f"{batch_size}; the run's data mix lacks that task")
    main_curve = curves[task]
    result = {"task": task, "layers": cfg.text.num_layers, "mean": main_curve["mean"].tolist(),
              "std": main_curve["std"].tolist(), "samples": main_curve["samples"], "checkpoint": str(ckpt.absolute()),
              "run_config": str(config_path) if config_path else None, "data_seed": data_seed, "spans": span_kw,
              "other": {t: {"mean": c["mean"].tolist(), "std": c["std"].tolist()}
                        for t, c in curves.items() if t != task}}
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")

    write_outputs(out.parent, {
        out.name: lambda p: p.write_text(json.dumps(result, indent=2) + "\n"),
        png.name: lambda p: plot_intensity(curves, bands, p, title=f"{ckpt}: cross-modal attention intensity"),
    })
    print(intensity_table(curves))
    print(f"wrote {out} and {png}")
    return result


def conflict_table(stats: dict) -> str:
    lines = [f"{'scope':8} {'group':14} {'cosine':>8} {'batch mean':>11} {'batch std':>10} {'|g_mmu|':>9} "
             f"{'|g_t2i|':>9}"]
    for g in stats["groups"]:
        lines.append(f"{g['scope']:8} {g['group']:14} {_fmt(g['cosine'], 8)} {_fmt(g['batch_cosine_mean'], 11)} "
                     f"{_fmt(g['batch_cosine_std'], 10)} {g['norm_mmu']:9.2e} {g['norm_t2i']:9.2e}")
    return "\n".join(lines)


def conflict(ckpt, *, num_batches=8, out=None, batch_size=None, seed=None, data_dir=None) -> dict:
    """Cosines between the MMU and T2I loss gradients per layer and parameter group of a checkpoint
    (`python -m unijax.analyze conflict`) over `num_batches` held-out batches of each task; None = the
    run's own value."""
    ckpt = pathlib.Path(ckpt)
    cfg = checkpoints.read_config(ckpt)
    config, config_path = run_config(ckpt)
    config.data.cfg_drop_prob = 0.0
    seed = config.seed if seed is None else seed
    batch_size = batch_size or config.train.batch_size
    data_dir = data_dir or config.data.dir
    out = pathlib.Path(out) if out else ckpt.absolute().parent / "analysis"
    und, images_per_row, data_seed = heldout_batches(cfg, config, num_batches, batch_size, seed, data_dir, "und")
    gen, _, _ = heldout_batches(cfg, config, num_batches, batch_size, seed, data_dir, "gen")

    keep = lambda b: {k: b[k] for k in contract.BATCH_KEYS}  # noqa: E731
    model = checkpoints.load_model(ckpt)
    stats = conflict_stats(model, map(keep, und), map(keep, gen), images_per_row)
    stats = {"checkpoint": str(ckpt.absolute()), "run_config": str(config_path) if config_path else None,
             "ffn": cfg.ffn, "data_seed": data_seed, "batch_size": batch_size, **stats}
    return _emit(out, "conflict", stats,
                 lambda p: plot_conflict(stats, p, title=f"{ckpt} ({cfg.ffn}): MMU vs T2I gradients"),
                 conflict_table(stats))


def learning_curves(rows: list[dict]) -> dict:
    """The held-out evaluations in a run's metrics.jsonl rows (`eval/*`, step 0 included when the run
    evaluated at its start): per step the accuracy overall and per question kind, the text and
    image-code losses, and the blind baselines."""
    evals = [r for r in rows if "eval/accuracy" in r or "eval/loss_image" in r]
    if not evals:
        raise ValueError("no held-out evaluation (eval/*) in the run's metrics.jsonl: set train.eval_every")
    kinds = list(dict.fromkeys(k[len("eval/accuracy_"):] for r in evals for k in r if k.startswith("eval/accuracy_")))
    last = evals[-1]
    nan = float("nan")
    return {"steps": [r["step"] for r in evals],
            "accuracy": {"all": [r.get("eval/accuracy", nan) for r in evals],
                         **{k: [r.get(f"eval/accuracy_{k}", nan) for r in evals] for k in kinds}},
            "loss_text": [r.get("eval/loss_text") for r in evals], "loss_image": [r.get("eval/loss_image") for r in evals],
            "blind_accuracy": last.get("eval/blind_accuracy"), "blind_loss_image": last.get("eval/blind_loss_image")}


def curves_table(c: dict) -> str:
    kinds = list(c["accuracy"])
    lines = ["step  " + " ".join(f"{k[:9]:>9}" for k in kinds) + "  loss_img  (blind acc "
             + _fmt(c["blind_accuracy"]) + ", blind loss_img " + _fmt(c["blind_loss_image"]) + ")"]
    for i, step in enumerate(c["steps"]):
        lines.append(f"{step:>5} " + " ".join(f"{_fmt(c['accuracy'][k][i], 9)}" for k in kinds)
                     + f"  {_fmt(c['loss_image'][i], 8)}")
    return "\n".join(lines)


def curves(workdir, *, out=None) -> dict:
    """A run's held-out learning curves from `<workdir>/metrics.jsonl` (`python -m unijax.analyze curves`)."""
    workdir = pathlib.Path(workdir)
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (--workdir must be a training run's workdir)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {n} is not JSON ({e})") from e
    result = learning_curves(rows)
    out = pathlib.Path(out) if out else workdir / "analysis"
    return _emit(out, "curves", result, lambda p: plot_curves(result, p, title=str(workdir)), curves_table(result))
