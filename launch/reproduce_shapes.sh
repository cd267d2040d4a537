#!/usr/bin/env bash
# UniDecouple's experiments end to end on the shapes world, on this machine (CPU is enough):
# the language stage, stage 0 (VQ), dense base, TOC validation (und only / gen only / both), stage 1 x 2, upcycling,
# stage 2, the AIA variants, held-out evaluation and a Markdown report with the paper's two tables.
#
#   bash launch/reproduce_shapes.sh                       # full run (3 seeds), writes workdir/reproduce/report.md
#   bash launch/reproduce_shapes.sh --quick --out /tmp/r  # every stage with a few steps (a smoke test)
#   bash launch/reproduce_shapes.sh --seeds 0,1,2,3       # more seeds; rerunning resumes, --fresh restarts
#
# Options are those of `python -m unijax.reproduce --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m unijax.reproduce "$@"
