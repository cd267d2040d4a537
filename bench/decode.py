"""Image-token decoding throughput with classifier-free guidance: unijax vs transformers, on CPU.

    python bench/decode.py                                  # both configs, 3 timed repeats each
    python bench/decode.py --configs tiny --repeats 1       # quick smoke run

For each config the same random transformers `JanusForConditionalGeneration` (float32, eval) is
copied into a unijax `Janus`, so both sides decode with identical weights. Both generate the
config's `num_image_tokens` VQ codes for a batch of 4 prompts (16 tokens, BOS first, begin-of-image
last) with CFG on (guidance 5, conditional + unconditional rows = 2 x batch decoded together) and
greedy sampling:

- transformers: `model.generate(ids, attention_mask=..., generation_mode="image", do_sample=False,
  guidance_scale=5.0)` with `torch.set_num_threads(--threads)`;
- unijax: `unijax.inference.decode.Generator(model).image_codes(ids, mask, guidance=5.0,
  sampling=Sampling(temperature=0.0))` (jitted: prefill + `lax.scan` over the token steps).

Each side is warmed up once (for unijax: compiled), then timed `--repeats` times; the median is
reported. Image tokens/s = batch x num_image_tokens / seconds (conditional rows only); the time
includes the 16-token prefill. The VQ decoder (codes -> pixels) is not timed.

Configs: `tiny` (the preset, 64 image tokens) and `100m` (a ~100M-parameter LLaMA decoder: hidden
768, 12 layers, 12 heads of 64, MLP 2048, vocab 32000; 256 image tokens; small vision tower and VQ).
For `100m` the script also measures the machine's memory read bandwidth and prints the
bandwidth-bound minimum time of one decode step (all weights read per step + the KV cache).

Targets (from the issue): unijax / transformers >= 5x on tiny, >= 1.5x on 100m.
Results are printed as a Markdown table and written to `--json` (default bench/results/decode.json).
"""

from __future__ import annotations

import os
import pathlib
import sys

# JAX on the real CPU cores: drop any forced fake-device count (tests/conftest.py sets 8 for meshes).
_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
os.environ["XLA_FLAGS"] = " ".join(_flags)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from unijax import checkpoints  # noqa: E402
from unijax.hf import janus as hf_mapping  # noqa: E402
from unijax.inference.decode import Generator  # noqa: E402
from unijax.inference.sampling import Sampling  # noqa: E402
from unijax.models.config import JanusConfig, TextConfig, VisionConfig, VQConfig  # noqa: E402
from unijax.models.family import preset
from unijax.models.janus import Janus  # noqa: E402  (type hints)

BATCH = 4
PROMPT_LEN = 16
GUIDANCE = 5.0
TARGETS = {"tiny": 5.0, "100m": 1.5}  # unijax / transformers image tokens/s


def config_100m() -> JanusConfig:
    """~110M-parameter decoder (~150M total with lm_head, generation head, VQ and vision tower)."""
    return JanusConfig(
        text=TextConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                        num_kv_heads=12, head_dim=64, max_position_embeddings=1024, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0),
        vision=VisionConfig(image_size=256, patch_size=16, hidden_size=64, num_layers=1, num_heads=2,
                            projection_dim=768),
        vq=VQConfig(num_embeddings=16384, embed_dim=8, latent_channels=32, base_channels=32,
                    channel_multiplier=(1, 1, 2, 2, 4), num_res_blocks=1, projection_dim=768,
                    image_token_embed_dim=768, image_size=256),
        image_token_id=3, boi_token_id=4, eoi_token_id=5,
    ).validate()


CONFIGS = {"tiny": lambda: preset("tiny"), "100m": config_100m}


# -- models ---------------------------------------------------------------------------------------
def build_hf(cfg: JanusConfig, seed: int = 0):
    from transformers import JanusConfig as HFJanusConfig
    from transformers import JanusForConditionalGeneration

    torch.manual_seed(seed)
    hf = JanusForConditionalGeneration(HFJanusConfig(**cfg.to_hf())).eval().to(torch.float32)
    gc = hf.generation_config
    gc._from_model_config = False
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = (cfg.text.bos_token_id, cfg.text.eos_token_id,
                                                         cfg.text.pad_token_id)
    gc.generation_kwargs = {"boi_token_id": cfg.boi_token_id, "eoi_token_id": cfg.eoi_token_id}
    return hf


def build_unijax_from_hf(cfg: JanusConfig, hf) -> Janus:
    """A unijax `Janus` holding exactly the weights of the transformers model `hf`.

    Built abstractly (`nnx.eval_shape`, no random init: an eager `Janus(cfg, rngs=...)` takes ~20 s
    at 150M parameters on this CPU), then every parameter is set from the transformers state dict.
    """
    model = checkpoints.abstract_model(cfg)
    sd = {k: v.detach().cpu().numpy() for k, v in hf.state_dict().items()}
    n, scanned = cfg.text.num_layers, cfg.scan_layers
    state = nnx.state(model, nnx.Param)
    flat = checkpoints.flat_params(state)
    new = {path: hf_mapping.import_tensor(path, sd.__getitem__, n, scanned).astype(x.dtype)
           for path, x in flat.items()}
    for path, x in flat.items():
        if new[path].shape != tuple(x.shape):
            raise ValueError(f"{path}: transformers shape {new[path].shape} != unijax {tuple(x.shape)}")

    def fill(node, prefix):
        if isinstance(node, dict):
            return {k: fill(v, f"{prefix}{k}.") for k, v in node.items()}
        return jnp.asarray(new[prefix[:-1]])

    nnx.replace_by_pure_dict(state, fill(state.to_pure_dict(), ""))
    nnx.update(model, state)
    return model


def param_counts(model: Janus) -> dict[str, int]:
    flat = checkpoints.flat_params(model)
    size = lambda pred: sum(int(np.prod(x.shape)) for p, x in flat.items() if pred(p))  # noqa: E731
    return {"total": size(lambda p: True), "decoder": size(lambda p: p.startswith("language_model."))}


def prompts(cfg: JanusConfig, seed: int = 0) -> np.ndarray:
    """[BATCH, PROMPT_LEN] ids: BOS, random non-special text ids, begin-of-image."""
    special = {cfg.text.bos_token_id, cfg.text.eos_token_id, cfg.text.pad_token_id, cfg.image_token_id,
               cfg.boi_token_id, cfg.eoi_token_id}
    low = max(special) + 1
    ids = np.random.default_rng(seed).integers(low, cfg.text.vocab_size, (BATCH, PROMPT_LEN))
    ids[:, 0], ids[:, -1] = cfg.text.bos_token_id, cfg.boi_token_id
    return ids.astype(np.int64)


# -- timing ---------------------------------------------------------------------------------------
def timed(fn, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def memory_bandwidth(gib: float = 1.0, repeats: int = 3) -> dict:
    """Read bandwidth (bytes/s) of a ~`gib` GiB float32 array: numpy sum (1 thread), torch sum
    (all torch threads), jitted jnp.sum; and numpy copy (read + write bytes / s). Best of `repeats`."""
    n = int(gib * (1 << 30)) // 4
    a = np.ones(n, np.float32)
    nbytes = a.nbytes
    res = {"array_bytes": nbytes}
    best = lambda fn: min(timed(fn, repeats)[0])  # noqa: E731
    res["numpy_sum_read_Bps"] = nbytes / best(lambda: a.sum())
    t = torch.from_numpy(a)
    res["torch_sum_read_Bps"] = nbytes / best(lambda: t.sum().item())
    x = jax.device_put(a)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    res["jax_sum_read_Bps"] = nbytes / best(lambda: f(x).block_until_ready())
    x = None  # frees the device array
    b = np.empty_like(a)
    res["numpy_copy_rw_Bps"] = 2 * nbytes / best(lambda: np.copyto(b, a))
    a = b = t = None  # frees the arrays
    res["read_Bps"] = max(res["numpy_sum_read_Bps"], res["torch_sum_read_Bps"], res["jax_sum_read_Bps"])
    return res


def step_bytes(model: Janus) -> dict:
    """Bytes one CFG decode step (2 x BATCH rows, one token) must read from memory.

    Weights: every decoder layer, the final norm, the generation head and the generation aligner,
    plus the 2 x BATCH generation-embedding rows gathered (the text embedding table and lm_head are
    not used in a step). KV cache: k and v of every layer for 2 x BATCH rows, either the full static
    length (prompt + image tokens; what both implementations read, masking the unwritten slots) or
    the average filled length (prompt + image tokens / 2; the ideal).
    """
    cfg = model.cfg
    t = cfg.text
    flat = checkpoints.flat_params(model)
    nbytes = lambda x: int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize  # noqa: E731
    used = ("language_model.layers.", "language_model.norm.", "generation_head.", "generation_aligner.")
    weights = sum(nbytes(x) for p, x in flat.items() if p.startswith(used))
    emb = flat["generation_embeddings.embedding"]
    weights += 2 * BATCH * emb.shape[1] * jnp.dtype(emb.dtype).itemsize
    rows, itemsize = 2 * BATCH, jnp.dtype(cfg.dtype).itemsize
    per_slot = 2 * t.num_layers * rows * t.num_kv_heads * t.head_dim * itemsize
    full_len = PROMPT_LEN + cfg.vq.num_tokens
    avg_len = PROMPT_LEN + cfg.vq.num_tokens / 2
    return {"weights": weights, "kv_full": per_slot * full_len, "kv_avg": int(per_slot * avg_len),
            "cache_len_full": full_len, "cache_len_avg": avg_len}


# -- one config -----------------------------------------------------------------------------------
def run_config(name: str, repeats: int, bandwidth: dict | None) -> dict:
    cfg = CONFIGS[name]()
    n_tok = cfg.vq.num_tokens
    print(f"\n## {name}: building models ...", flush=True)
    hf = build_hf(cfg)
    model = build_unijax_from_hf(cfg, hf)
    counts = param_counts(model)
    hf_total = sum(p.numel() for p in hf.parameters())
    print(f"params: decoder (text model) {counts['decoder']:,}; total {counts['total']:,} "
          f"(transformers total {hf_total:,})", flush=True)

    ids = prompts(cfg)
    ids_t, mask_t = torch.from_numpy(ids), torch.ones(ids.shape, dtype=torch.long)
    ids_j, mask_j = jnp.asarray(ids, jnp.int32), jnp.ones(ids.shape, jnp.int32)

    generator = Generator(model)  # split once, as a serving loop would

    @torch.inference_mode()
    def run_hf():
        return hf.generate(ids_t, attention_mask=mask_t, generation_mode="image", do_sample=False,
                           guidance_scale=GUIDANCE)

    def run_jax():
        return jax.block_until_ready(generator.image_codes(ids_j, mask_j, guidance=GUIDANCE,
                                                           sampling=Sampling(temperature=0.0), num_tokens=n_tok))

    def warm_and_time(label, warm_label, fn):
        t0 = time.perf_counter()
        fn()
        warm_s = time.perf_counter() - t0
        print(f"{label} warm-up ({warm_label}): {warm_s:.1f}s", flush=True)
        times, out = timed(fn, repeats)
        print(f"{label}: {' '.join(f'{s:.3f}s' for s in times)}", flush=True)
        return warm_s, times, out

    compile_s, jax_times, jax_codes = warm_and_time("unijax", "compile + 1 run", run_jax)
    hf_warm_s, hf_times, hf_codes = warm_and_time("transformers", "1 run", run_hf)

    hf_codes, jax_codes = np.asarray(hf_codes), np.asarray(jax_codes)
    if hf_codes.shape != jax_codes.shape:
        raise RuntimeError(f"code shapes differ: transformers {hf_codes.shape}, unijax {jax_codes.shape}")
    agree = float((hf_codes == jax_codes).mean())
    first_diff = np.argwhere((hf_codes != jax_codes).any(0))
    print(f"greedy codes equal to transformers': {agree:.1%}"
          + ("" if agree == 1.0 else f" (first differing step {int(first_diff[0, 0])})"), flush=True)

    hf_s, jax_s = statistics.median(hf_times), statistics.median(jax_times)
    noisy = [who for who, ts in (("unijax", jax_times), ("transformers", hf_times)) if max(ts) > 1.5 * min(ts)]
    if noisy:
        print(f"WARNING: repeat times of {' and '.join(noisy)} vary by more than 1.5x: the machine is busy, "
              "the numbers are unreliable", flush=True)
    row = {
        "config": name, "params_total": counts["total"], "params_decoder": counts["decoder"],
        "image_tokens": n_tok, "batch": BATCH, "prompt_len": PROMPT_LEN, "guidance": GUIDANCE,
        "transformers_s": hf_s, "unijax_s": jax_s, "transformers_times_s": hf_times, "unijax_times_s": jax_times,
        "transformers_tok_s": BATCH * n_tok / hf_s, "unijax_tok_s": BATCH * n_tok / jax_s,
        "speedup": hf_s / jax_s, "target": TARGETS.get(name), "unijax_compile_s": compile_s,
        "codes_agreement": agree, "noisy": noisy,
    }
    if bandwidth is not None:
        sb = step_bytes(model)
        bw = bandwidth["read_Bps"]
        row["bandwidth"] = {
            **sb, "bytes_per_step_full": sb["weights"] + sb["kv_full"], "bytes_per_step_avg": sb["weights"] + sb["kv_avg"],
            "read_Bps": bw,
            "bound_step_s_full": (sb["weights"] + sb["kv_full"]) / bw,
            "bound_step_s_avg": (sb["weights"] + sb["kv_avg"]) / bw,
            "unijax_step_s": jax_s / n_tok, "transformers_step_s": hf_s / n_tok,
        }
    return row


# -- report ---------------------------------------------------------------------------------------
def fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def report(rows: list[dict], bandwidth: dict | None) -> None:
    print("\n| config | params (decoder / total) | image tokens | batch | transformers tok/s | unijax tok/s "
          "| speedup | target |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        tgt = r["target"]
        verdict = "" if tgt is None else f">= {tgt:g}x ({'met' if r['speedup'] >= tgt else 'NOT met'})"
        print(f"| {r['config']} | {fmt_params(r['params_decoder'])} / {fmt_params(r['params_total'])} "
              f"| {r['image_tokens']} | {r['batch']} | {r['transformers_tok_s']:.1f} | {r['unijax_tok_s']:.1f} "
              f"| {r['speedup']:.2f}x | {verdict} |")
    print("\n(image tokens/s = batch x image tokens / median seconds of one full generation, prefill included; "
          "CFG on, guidance 5, greedy; conditional rows only)")
    if bandwidth is not None:
        gb = 1e9
        print(f"\nmemory bandwidth ({bandwidth['array_bytes'] / (1 << 30):.0f} GiB float32 array): "
              f"read {bandwidth['read_Bps'] / gb:.1f} GB/s (best of numpy sum {bandwidth['numpy_sum_read_Bps'] / gb:.1f}, "
              f"torch sum {bandwidth['torch_sum_read_Bps'] / gb:.1f}, jax sum {bandwidth['jax_sum_read_Bps'] / gb:.1f}); "
              f"numpy copy {bandwidth['numpy_copy_rw_Bps'] / gb:.1f} GB/s (read + write)")
    for r in rows:
        b = r.get("bandwidth")
        if not b:
            continue
        mb = 1e6
        print(f"\n{r['config']}: bandwidth bound of one decode step ({2 * r['batch']} CFG rows, float32):")
        print(f"  bytes/step: weights {b['weights'] / mb:.1f} MB + KV cache {b['kv_full'] / mb:.1f} MB "
              f"(full static length {b['cache_len_full']}) = {b['bytes_per_step_full'] / mb:.1f} MB; "
              f"with the average filled length {b['cache_len_avg']:g}: {b['bytes_per_step_avg'] / mb:.1f} MB")
        print(f"  bound step time at {b['read_Bps'] / 1e9:.1f} GB/s: {b['bound_step_s_full'] * 1e3:.2f} ms "
              f"(full cache), {b['bound_step_s_avg'] * 1e3:.2f} ms (average filled cache)")
        for who in ("unijax", "transformers"):
            s = b[f"{who}_step_s"]
            print(f"  {who}: measured {s * 1e3:.2f} ms/step -> {b['bound_step_s_full'] / s:.0%} of the bound "
                  f"(full cache), {b['bound_step_s_avg'] / s:.0%} (average filled)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="tiny,100m", help="comma-separated subset of: " + ",".join(CONFIGS))
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per side (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for transformers")
    p.add_argument("--json", default="bench/results/decode.json", help="output JSON path")
    args = p.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {sorted(CONFIGS)}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")

    torch.set_num_threads(args.threads)
    print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device(s)), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} CPU cores", flush=True)

    bandwidth = None
    if "100m" in names:
        print("measuring memory bandwidth ...", flush=True)
        bandwidth = memory_bandwidth()
    rows = [run_config(n, args.repeats, bandwidth if n == "100m" else None) for n in names]
    report(rows, bandwidth)

    import transformers

    out = pathlib.Path(args.json)
    if not out.is_absolute():
        out = pathlib.Path.cwd() / out
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "image-token decoding, CFG on (guidance 5), greedy, batch 4, 16-token prompts",
        "command": "python " + " ".join([pathlib.Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:])),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "repeats": args.repeats,
        "env": {"jax": jax.__version__, "flax": flax.__version__,
                "torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version(), "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(), "jax_devices": jax.device_count(),
                "xla_flags": os.environ.get("XLA_FLAGS", "")},
        "targets": TARGETS,
        "memory_bandwidth": bandwidth,
        "results": rows,
    }
    out.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
