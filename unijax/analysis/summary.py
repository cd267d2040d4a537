"""The reproduction's analysis step (`unijax.analysis.recipe.run`): attention-intensity curves and
gradient cosines of the reproduction's models, summarised over seeds as plots and report tables."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from unijax import checkpoints
from unijax.analysis import commands, plots
from unijax.io import write_outputs
from unijax.training import aia


def cell(values: list[float]) -> str:
    """A report cell: the value, or mean ± std over seeds."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


INTENSITY_RUNS = (("base", "base"), ("joint", "dense joint"), ("aia", "dense + AIA"), ("stage2", "TA-MoE"),
                  ("stage2_aia", "TA-MoE + AIA"))
CONFLICT_RUNS = (("joint", "dense joint"), ("stage2", "TA-MoE"))
# the conflict table's and plot's groups: per run label, the parameter group (unijax.analysis.conflict.param_group)
CONFLICT_GROUPS = {"whole layer": {"dense joint": "all", "TA-MoE": "all"},
                   "attention": {"dense joint": "attention", "TA-MoE": "attention"},
                   "FFN (TA-MoE: routed experts)": {"dense joint": "ffn", "TA-MoE": "experts"},
                   "TA-MoE shared expert": {"TA-MoE": "shared_expert"}}


def _analysed(path: pathlib.Path, compute) -> dict:
    """`path`'s JSON, computed first (`compute()` writes it) unless an earlier run left it complete."""
    if not path.is_file():
        compute()
    return json.loads(path.read_text())


def analyse(out: pathlib.Path, seeds: list[int], intensity_samples: int, conflict_batches: int) -> dict:
    """`python -m unijax.analyze intensity` on the base, dense, AIA and TA-MoE runs of every seed and
    `python -m unijax.analyze conflict` on dense joint vs TA-MoE (each written under `<run>/analysis/`,
    reused on reruns), summarised as `DIR/intensity.png` (both tasks' curves, mean +- std over seeds,
    against the AIA runs' targets) and `DIR/conflict.png` (per-layer gradient cosines)."""
    def runs(name):  # the run directories of one INTENSITY_RUNS / CONFLICT_RUNS entry
        return [out / "base"] if name == "base" else [out / f"seed{s}" / name for s in seeds]

    intensity = {}
    for run, label in INTENSITY_RUNS:
        intensity[label] = {"und": [], "gen": []}
        for d in runs(run):
            r = _analysed(d / "analysis" / "intensity_und.json", lambda d=d: commands.intensity(
                d / "model", "und", samples=intensity_samples))
            intensity[label]["und"].append(r["mean"])
            intensity[label]["gen"].append(r["other"]["gen"]["mean"])
    conflict = {}
    for run, label in CONFLICT_RUNS:
        conflict[label] = {}
        for d in runs(run):
            stats = _analysed(d / "analysis" / "conflict.json", lambda d=d: commands.conflict(
                d / "model", num_batches=conflict_batches))
            for g in stats["groups"]:
                conflict[label].setdefault(f"{g['scope']}/{g['group']}", []).append(g["cosine"])
    aia_run = json.loads((out / f"seed{seeds[0]}" / "aia" / "config.json").read_text())["aia"]
    layers = checkpoints.read_config(out / "base" / "model").text.num_layers
    targets = {t: aia.layer_targets(aia_run[f"{t}_targets"], t, layers, aia_run["curve_delta"]) for t in aia.AIA_TASKS}
    write_outputs(out, {
        "intensity.png": lambda p: plots.plot_intensity_runs(
            intensity, targets, p, title=f"cross-modal attention intensity, {intensity_samples} held-out samples "
                                         f"per task and run (mean +- std over seeds)"),
        "conflict.png": lambda p: plots.plot_conflict_runs(
            conflict, CONFLICT_GROUPS, p, title=f"cos(MMU gradient, T2I gradient), {conflict_batches} held-out batches per "
                                      f"task (mean +- std over seeds)"),
    })
    return {"intensity": intensity, "targets": {t: {"target": list(map(float, v.target)), "delta": list(map(float, v.delta))}
                                                for t, v in targets.items()},
            "conflict": conflict}


def analysis_tables(analysis: dict) -> str:
    """The report's intensity tables (per task: each run's per-layer mean over seeds and its mean
    distance to the targets) and gradient-conflict table (per layer and group, mean ± std over seeds)."""
    lines = []
    for task, name in (("und", "Understanding (answer tokens -> image tokens)"),
                       ("gen", "Generation (image tokens -> prompt tokens)")):
        t = np.asarray(analysis["targets"][task]["target"])
        lines += [f"{name}: intensity per layer, mean over seeds (± std), and mean |intensity − target| over layers.",
                  "", "| run | " + " | ".join(f"layer {l}" for l in range(len(t))) + " | mean abs. gap |",
                  "|---|" + "---|" * (len(t) + 1)]
        for label, c in analysis["intensity"].items():
            a = np.asarray(c[task], dtype=np.float64)
            lines.append(f"| {label} | " + " | ".join(cell(list(a[:, l])) for l in range(len(t)))
                         + f" | {cell(list(np.mean(np.abs(a - t), axis=1)))} |")
        lines += ["| AIA target | " + " | ".join(f"{v:.3f}" for v in t) + " | |", ""]
    groups = [(label, g) for per_run in CONFLICT_GROUPS.values() for label, g in per_run.items()]
    layer_keys = sorted({k.split("/")[0] for c in analysis["conflict"].values() for k in c if k.startswith("layer")},
                        key=lambda k: int(k[5:]))
    lines += ["Gradient conflict: cos(MMU loss gradient, T2I loss gradient) per decoder layer and parameter group "
              "(negative: the tasks pull the weights apart), mean ± std over seeds.", "",
              "| layer | " + " | ".join(f"{label}: {g}" for label, g in groups) + " |",
              "|---|" + "---|" * len(groups)]
    for layer in layer_keys:
        cells = []
        for label, g in groups:
            v = [x for x in analysis["conflict"][label].get(f"{layer}/{g}", []) if x is not None]
            cells.append(cell(v) if v else "-")
        lines.append(f"| {layer[5:]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
