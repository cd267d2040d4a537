"""Pack your data into ArrayRecord shards: conversations (.json / .jsonl) and captions (.jsonl /
.parquet) -> `<out>/<task>-SSSSS-of-NNNNN.arrayrecord`, the images' original bytes kept.

    python -m unijax.pack --mmu data/llava.json,data/more.jsonl --mmu_image_root data/images \\
        --t2i data/captions.parquet --out data/packed --records_per_shard 10000

then train with `--config.data.mmu_arrayrecord='data/packed/mmu-*.arrayrecord'` (and t2i; preference
pairs, `--pref pairs.jsonl`: `--config.data.pref_arrayrecord='data/packed/pref-*.arrayrecord'`). Progress
and ETA go to stderr; `<out>/index.json` counts each shard's records and skipped bad records, and
rerunning the same command resumes at the first unfinished shard
(`unijax.data.arrayrecord.pack`).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from unijax.cli import UserError, run_argparse
from unijax.data.arrayrecord import pack


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m unijax.pack", description=__doc__.split("\n\n")[0])
    p.add_argument("--mmu", default="", help="comma-separated conversation files (.json, .jsonl)")
    p.add_argument("--mmu_image_root", default="", help="their images' folder (default: each file's folder)")
    p.add_argument("--t2i", default="", help="comma-separated caption files (.jsonl, .parquet)")
    p.add_argument("--t2i_image_root", default="", help="their images' folder (default: each file's folder)")
    p.add_argument("--pref", default="", help="comma-separated preference-pair files (.jsonl: align-anything / TRL)")
    p.add_argument("--pref_image_root", default="", help="their images' folder")
    p.add_argument("--out", required=True, help="output folder (shards and index.json)")
    p.add_argument("--records_per_shard", type=int, default=10000)
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    p.add_argument("--overwrite", action="store_true", help="repack although index.json was made from other inputs")
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    files = {t: [f for f in getattr(args, t).split(",") if f] for t in ("mmu", "t2i", "pref")}
    if not any(files.values()):
        raise UserError("nothing to pack: give --mmu, --t2i and/or --pref files")
    if args.records_per_shard < 1:
        raise UserError(f"--records_per_shard={args.records_per_shard} must be >= 1")
    t0 = time.perf_counter()

    def progress(done: int, total: int):
        elapsed = time.perf_counter() - t0
        eta = elapsed / max(done, 1) * (total - done)
        bar = "#" * int(30 * done / max(total, 1))
        print(f"\rpack [{bar:<30}] {done:,}/{total:,} records, {done / max(elapsed, 1e-9):,.0f}/s, "
              f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}", end="", file=sys.stderr, flush=True)

    index = pack(files, {t: getattr(args, f"{t}_image_root") for t in files}, args.out,
                 records_per_shard=args.records_per_shard, skip_bad_records=not args.strict,
                 overwrite=args.overwrite, progress=progress)
    print(file=sys.stderr)
    shards = index["shards"]
    for task in ("mmu", "t2i", "pref"):
        mine = [v for v in shards.values() if v["task"] == task]
        if mine:
            print(f"{task}: {len(mine)} shards, {sum(v['records'] for v in mine):,} records, "
                  f"{sum(v['skipped'] for v in mine):,} bad records skipped")
    for line in index["skipped_summary"]:
        print(line)
    if index["skipped_summary"]:
        print(f"every skipped record (file, index, reason): {pathlib.Path(args.out) / 'skipped.jsonl'}")
    print(f"wrote {args.out}")
    return index


if __name__ == "__main__":
    run_argparse(main)
