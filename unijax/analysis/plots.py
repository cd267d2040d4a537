"""Pictures of the analyses: expert loads, attention-intensity curves against their targets, and
gradient conflict. matplotlib is imported when a plot is drawn (its Agg backend, no display)."""

from __future__ import annotations

import numpy as np


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


def plot_curves(curves: dict, path, title: str = "") -> None:
    """A run's held-out learning curves (`commands.learning_curves`): understanding accuracy per
    question kind with the image-blind answerer's (left), image-code loss against the prompt-blind
    generator's (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    steps = curves["steps"]
    for key, values in curves["accuracy"].items():
        left.plot(steps, values, marker="o", lw=2.5 if key == "all" else 1.0, label=key)
    if curves.get("blind_accuracy") is not None:
        left.axhline(curves["blind_accuracy"], color="k", ls="--", lw=1, label="image-blind (all)")
    left.set_ylim(-0.02, 1.02)
    left.set_xlabel("step")
    left.set_ylabel("held-out accuracy")
    left.legend(fontsize=7, ncol=2, loc="upper left")
    for key, style in (("loss_image", "o-"), ("loss_text", "s-")):
        if any(v is not None for v in curves[key]):
            right.plot(steps, [np.nan if v is None else v for v in curves[key]], style, label=key)
    if curves.get("blind_loss_image") is not None:
        right.axhline(curves["blind_loss_image"], color="k", ls="--", lw=1, label="prompt-blind loss_image")
    right.set_xlabel("step")
    right.set_ylabel("held-out loss (nats per token)")
    right.legend(fontsize=8)
    fig.suptitle(title or "learning curves", fontsize=9)
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)


def _mean_std(rows) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray([[np.nan if v is None else v for v in r] for r in rows], dtype=np.float64)
    return np.nanmean(a, axis=0), np.nanstd(a, axis=0)


def plot_intensity_runs(curves: dict, targets: dict, path, title: str = "") -> None:
    """Several runs' intensity curves, one panel per task: `curves[label][task]` holds one per-layer
    curve per seed (drawn as mean +- std over seeds); `targets[task]` (`aia.Targets`) as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = ("und", "gen")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0), layout="constrained", sharey=True)
    names = {"und": "understanding (answer -> image)", "gen": "generation (image -> prompt)"}
    for ax, task in zip(axes, tasks):
        for label, c in curves.items():
            mean, std = _mean_std(c[task])
            layers = np.arange(len(mean))
            line, = ax.plot(layers, mean, "o-", label=f"{label} (n={len(c[task])})")
            ax.fill_between(layers, mean - std, mean + std, color=line.get_color(), alpha=0.12)
        if task in targets:
            t, d = np.asarray(targets[task].target), np.asarray(targets[task].delta)
            layers = np.arange(len(t))
            ax.step(layers, t, where="mid", color="k", ls="--", lw=1, label="AIA target (+- delta)")
            ax.fill_between(layers, t - d, t + d, step="mid", color="k", alpha=0.07)
        ax.set_title(names[task], fontsize=9)
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cross-modal attention intensity")
    axes[1].legend(fontsize=7)
    fig.suptitle(title or "cross-modal attention intensity", fontsize=9)
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)


def plot_conflict_runs(cosines: dict, groups: dict, path, title: str = "") -> None:
    """Per-layer MMU-T2I gradient cosines of several runs, one panel per group name: `cosines[label]`
    maps `layer<i>/<group>` to one cosine per seed (mean +- std over seeds); `groups[panel]` lists,
    per run label, the group drawn in that panel (e.g. dense `ffn` beside TA-MoE `experts`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.8), layout="constrained", sharey=True)
    colours = {label: f"C{i}" for i, label in enumerate(cosines)}  # one colour per run in every panel
    for ax, (panel, per_run) in zip(np.atleast_1d(axes), groups.items()):
        for label, group in per_run.items():
            keys = sorted((k for k in cosines[label] if k.endswith("/" + group) and k.startswith("layer")),
                          key=lambda k: int(k.split("/")[0][5:]))
            if not keys:
                continue
            mean, std = _mean_std(np.asarray([cosines[label][k] for k in keys], dtype=object).T.tolist())
            layers = [int(k.split("/")[0][5:]) for k in keys]
            ax.plot(layers, mean, "o-", color=colours[label], label=f"{label}: {group}")
            ax.fill_between(layers, mean - std, mean + std, color=colours[label], alpha=0.15)
            ax.set_xticks(layers)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("decoder layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    np.atleast_1d(axes)[0].set_ylabel("cos(g_MMU, g_T2I)")
    fig.suptitle(title or "gradient conflict", fontsize=9)
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)
