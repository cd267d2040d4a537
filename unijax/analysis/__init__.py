"""Analyses of trained models, above the training layer (they run the model and its losses):

- `experts`: TA-MoE task-router accuracy, expert loads, dropped assignments, shared-expert alpha;
- `intensity`: per-layer cross-modal attention intensity curves (AIA targets);
- `conflict`: cosines between the understanding and generation loss gradients;
- `heldout`: the run's config and held-out batches an analysis reads;
- `plots`: their pictures; `commands`: the three `python -m unijax.analyze` commands;
- `recipe`: the paper's experiments end to end (`python -m unijax.reproduce`).
"""
