"""AIA overhead: a full jitted train step with the AIA loss off, on by the explicit-probabilities
path and on by the lean (indicator channel) path.

    python bench/aia.py                      # tiny (32 x 112) and seq1024 (4 x 1024, packed), 3 repeats
    python bench/aia.py --sizes tiny --repeats 1

A step is the training loop's (`unijax.training.steps.make_train_step`: forward, backward, AdamW
update) on shapes-world batches of `configs/aia.py` (official weights 5 / 10, Janus-Pro table
targets). Sizes: `tiny` (the base batch: 32 rows of 112 tokens) and `seq1024` (4 rows of 1,024
tokens, samples packed; each row holds ~10 samples of both tasks). Variants:

- `off`            AIA off, explicit softmax attention (`model.attention_impl = "xla"`)
- `explicit`       AIA on, mass summed from the explicit probabilities
- `lean`           AIA on, indicator channel in V, same attention kernel
- `chunked_off`    AIA off, query-blocked attention (`attention_impl = "chunked"`: O(T) memory)
- `chunked_lean`   AIA on, lean path on the chunked kernel
- `cudnn_off`, `cudnn_lean` (GPU only, by default): `jax.nn.dot_product_attention` (cuDNN's fused
                   kernel), AIA off and lean

Each variant is compiled and run once, then timed `--repeats` times (median). Target (issue 5):
the lean path costs at most 10 % extra step time over AIA off on the same kernel. The compiled
step's temporary memory (`memory_analysis().temp_size_in_bytes`) is reported too. Results go to
a Markdown table and to `--json` (default bench/results/aia.json).
"""

from __future__ import annotations

import os
import pathlib
import sys

_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
os.environ["XLA_FLAGS"] = " ".join(_flags)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import machine_meta, write_json  # noqa: E402
from configs import aia as aia_config  # noqa: E402
from unijax import contract
from unijax.data import datasets, pipeline, shapes  # noqa: E402
from unijax.data.tokenizer import load_tokenizer  # noqa: E402
from unijax.models.janus import Janus  # noqa: E402
from unijax.training import objectives, steps  # noqa: E402
from unijax.training.config import model_config  # noqa: E402
from unijax.training.optimizer import learning_rate, make_optimizer  # noqa: E402
from unijax.training.params import split_trainable  # noqa: E402

SIZES = {"tiny": dict(batch=32, max_len=112, packing=False), "seq1024": dict(batch=4, max_len=1024, packing=True)}
VARIANTS = {"off": ("xla", None), "explicit": ("xla", "explicit"), "lean": ("xla", "lean"),
            "chunked_off": ("chunked", None), "chunked_lean": ("chunked", "lean"),
            "cudnn_off": ("cudnn", None), "cudnn_lean": ("cudnn", "lean")}
BASELINE = {"explicit": "off", "lean": "off", "chunked_lean": "chunked_off", "cudnn_lean": "cudnn_off"}
TARGET = 0.10


def config_for(size: dict, impl: str, aia_impl: str | None, data_dir: str):
    c = aia_config.get_config()
    c.data.dir = data_dir
    c.data.max_len, c.data.packing = size["max_len"], size["packing"]
    c.train.batch_size = size["batch"]
    c.model.attention_impl = impl
    if aia_impl is None:
        c.loss.aia_weight, c.loss.aia_gen_weight, c.loss.aia_und_weight = 0.0, None, None
    else:
        c.aia.impl = aia_impl
    return c


def time_variant(name: str, size: dict, repeats: int, data_dir: str) -> dict:
    impl, aia_impl = VARIANTS[name]
    config = config_for(size, impl, aia_impl, data_dir)
    cfg = model_config(config)
    tok = load_tokenizer(config.data.tokenizer, config.data.dir)
    layout = pipeline.Layout.from_model(cfg, config.data.max_len, config.data.cfg_drop_prob)
    ds, w = datasets.task_datasets(config.data, layout.image_size, 0)
    it = iter(pipeline.batches(ds, w, tokenizer=tok, layout=layout, batch_size=size["batch"], seed=0,
                               packing=config.data.packing, kinds=tuple(shapes.KINDS)))
    batch = {k: jnp.asarray(v) for k, v in next(it).items() if k in contract.BATCH_KEYS}
    if hasattr(it, "close"):
        it.close()
    graphdef, train_state, frozen_state = split_trainable(Janus(cfg, rngs=nnx.Rngs(0)), config.train.trainable,
                                                         config.train.frozen)
    params, frozen = nnx.to_pure_dict(train_state), nnx.to_pure_dict(frozen_state)
    tx = make_optimizer(config.train)
    loss_fn, _ = objectives.functions(config, layout.images_per_row(config.data.packing), cfg.text.num_layers)
    step = jax.jit(steps.make_train_step(graphdef, tx, loss_fn, learning_rate(config.train)), donate_argnums=(0,))
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "rng": jax.random.PRNGKey(0)}
    compiled = step.lower(state, frozen, batch).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    t0 = time.perf_counter()
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return {"variant": name, "attention_impl": impl, "aia_impl": aia_impl, "ms": 1e3 * statistics.median(times),
            "first_call_s": first, "repeats": repeats, "temp_mib": temp / 2 ** 20,
            "tokens": int(jnp.sum(batch["segment_ids"] > 0)), "aia_und": float(metrics.get("aia_und", float("nan")))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="tiny,seq1024")
    ap.add_argument("--variants", default=None, help="default: all; the cudnn ones only on a GPU")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data_dir", default=None, help="shapes tokenizer cache (default: a temporary directory)")
    ap.add_argument("--json", default=str(REPO_ROOT / "bench" / "results" / "aia.json"))
    args = ap.parse_args(argv)
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="unijax_bench_")
    backend = jax.default_backend()
    variants = args.variants.split(",") if args.variants else [v for v in VARIANTS if backend == "gpu" or
                                                                 not v.startswith("cudnn")]
    rows = []
    for size_name in args.sizes.split(","):
        res = {}
        for name in variants:
            res[name] = time_variant(name, SIZES[size_name], args.repeats, data_dir)
            print(f"  {size_name:8s} {name:13s} {res[name]['ms']:9.1f} ms  temp {res[name]['temp_mib']:8.1f} MiB",
                  flush=True)
        for name, r in res.items():
            base = BASELINE.get(name)
            r.update(size=size_name, rows=SIZES[size_name]["batch"], max_len=SIZES[size_name]["max_len"],
                     overhead=(r["ms"] / res[base]["ms"] - 1) if base in res else None)
            rows.append(r)
    print(f"\nbackend: {backend} ({jax.devices()[0].device_kind}); one train step (fwd + bwd + AdamW), "
          f"median of {args.repeats}\n")
    print("| size | variant | attention | AIA path | ms | overhead vs AIA off | temp MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ov = "-" if r["overhead"] is None else f"{100 * r['overhead']:+.1f} %"
        print(f"| {r['size']} ({r['rows']} x {r['max_len']}) | {r['variant']} | {r['attention_impl']} | "
              f"{r['aia_impl'] or 'off'} | {r['ms']:.1f} | {ov} | {r['temp_mib']:.1f} |")
    summary = {}
    for r in rows:
        if r["aia_impl"] == "lean" and r["overhead"] is not None:
            summary[f"{r['size']}/{r['variant']}"] = {"overhead": r["overhead"],
                                                      "meets_target": r["overhead"] <= TARGET}
            print(f"{r['size']} {r['variant']}: {100 * r['overhead']:+.1f} % step time (target <= "
                  f"{100 * TARGET:.0f} %: {'met' if r['overhead'] <= TARGET else 'NOT met'})")
    write_json(args.json, {"meta": machine_meta(target_overhead=TARGET), "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
