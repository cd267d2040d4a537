"""Peak memory of the input pipeline on files at real sizes, bounded read-ahead against grain's defaults.

    python bench/pipeline_memory.py                     # 3 settings, 12 batches each (~1 min)
    python bench/pipeline_memory.py --batches 4         # quicker

A synthetic files world is written to a temporary directory: `--images` JPEG photos of 1024 x 768
(random smooth content, ~150 KB each), a LLaVA JSON with one conversation per image and a caption
JSONL, as a user's data would look. Each setting runs in a fresh process that builds the training
pipeline of the Janus-Pro-1B layout (384-pixel images, 576 image tokens, `data.max_len` 1024, the
tokenizer being irrelevant to memory: the shapes one) and draws `--batches` batches of
`--batch_size` rows with a pause after each (a train step's time, in which read-ahead fills), then
reports its peak resident memory (`ru_maxrss`). Settings:

- `grain defaults`: `ReadOptions()` as grain ships it, 16 threads and 500 elements (batches) ahead;
- `unijax`: `data.read_threads=4, data.read_ahead=4` (the defaults);
- `unijax, 2 workers`: the same with `data.num_workers=2` (each worker process keeps one batch ready;
  the peak is the training process's, the workers' own memory reported apart).

Prints a Markdown table and writes `--json` (default bench/results/pipeline_memory.json).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

SETTINGS = {"grain defaults": dict(read_threads=16, read_ahead=500, num_workers=0),
            "unijax": dict(read_threads=4, read_ahead=4, num_workers=0),
            "unijax, 2 workers": dict(read_threads=4, read_ahead=4, num_workers=2)}


def make_world(root: pathlib.Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    convs, caps = [], []
    for i in range(n):
        base = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(base).resize((1024, 768), Image.BICUBIC).save(root / "img" / f"{i}.jpg", quality=90)
        convs.append({"image": f"img/{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the circle?"}, {"from": "gpt", "value": "red"}]})
        caps.append(json.dumps({"image": f"img/{i}.jpg", "caption": "a red circle above a blue square"}))
    (root / "mmu.json").write_text(json.dumps(convs))
    (root / "t2i.jsonl").write_text("\n".join(caps) + "\n")


def child(root: str, setting: str, batches: int, batch_size: int, pause: float) -> None:
    """One setting in this process: prints a JSON line with the peak RSS."""
    from absl import flags

    from unijax.data import datasets, pipeline
    from unijax.data.tokenizer import load_tokenizer
    from unijax.models.family import preset
    from unijax.training.config import defaults

    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
        flags.FLAGS.mark_as_parsed()
    s = SETTINGS[setting]
    c = defaults()
    c.data.update(source="files", mmu_json=f"{root}/mmu.json", mmu_image_root=root, t2i_jsonl=f"{root}/t2i.jsonl",
                  t2i_image_root=root, max_len=1024)
    cfg = preset("janus_pro_1b")
    layout = pipeline.Layout.for_data(cfg, c.data)
    dsets, weights = datasets.task_datasets(c.data, layout.image_size, 0)
    tok = load_tokenizer("shapes", tempfile.mkdtemp())
    it = iter(pipeline.batches(dsets, weights, tokenizer=tok, layout=layout, batch_size=batch_size, seed=0,
                               num_workers=s["num_workers"], read_threads=s["read_threads"],
                               read_ahead=s["read_ahead"]))
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        time.sleep(pause)
    seconds = time.perf_counter() - t0
    batch_mb = sum(v.nbytes for v in b.values() if hasattr(v, "nbytes")) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    workers = sum(_peak_kib(pid) for pid in _children()) / 2**10
    print(json.dumps({"setting": setting, "peak_mib": peak, "workers_peak_mib": workers if s["num_workers"] else 0.0,
                      "batch_mib": batch_mb, "seconds": seconds, **s}), flush=True)
    if hasattr(it, "close"):
        it.close()


def _children() -> list[int]:
    """This process's living descendants (grain's worker processes)."""
    me, out = os.getpid(), []
    parents = {}
    for d in pathlib.Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    frontier = [me]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def _peak_kib(pid: int) -> int:
    """A process's peak resident set (VmHWM), KiB."""
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--pause", type=float, default=1.0, help="seconds after each batch (a train step)")
    p.add_argument("--json", default=str(REPO / "bench/results/pipeline_memory.json"))
    p.add_argument("--child", nargs=2, metavar=("ROOT", "SETTING"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child[0], a.child[1], a.batches, a.batch_size, a.pause)
        return
    from bench.common import machine_meta, write_json

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_world(pathlib.Path(tmp), a.images)
        for setting in SETTINGS:
            r = subprocess.run([sys.executable, __file__, "--child", tmp, setting, "--batches", str(a.batches),
                                "--batch_size", str(a.batch_size), "--pause", str(a.pause)],
                               capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
                                                                     "PYTHONPATH": str(REPO)})
            if r.returncode:
                raise SystemExit(f"{setting}: {r.stderr[-2000:]}")
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"| setting ({a.batch_size} rows x 1024 tokens, {a.batches} batches) | read threads | read-ahead | "
          f"workers | peak RSS (training process) | workers' peak | one batch |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['read_threads']} | {r['read_ahead']} | {r['num_workers']} | "
              f"{r['peak_mib']:,.0f} MiB | {r['workers_peak_mib']:,.0f} MiB | {r['batch_mib']:.1f} MiB |")
    write_json(a.json, {"meta": machine_meta(), "rows": rows})


if __name__ == "__main__":
    main()
