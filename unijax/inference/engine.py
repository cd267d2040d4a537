"""Batched inference on a model checkpoint: answers (MMU) and images (T2I) from plain inputs.

`Engine.load(ckpt)` restores any checkpoint unijax writes or converts (dense, TA-MoE, a LoRA
adapter directory, a converted Janus-Pro) with its tokenizer, and keeps one `decode.Generator`:

    engine = Engine.load("workdir/stage2/model")
    engine.answer([image], ["what colour is the circle?"])     # -> ["red"]
    engine.images(["a red circle"], num_images=4, guidance=5)  # -> uint8 [1, 4, H, W, 3]

Prompts are left-padded to a multiple of `PAD_TO` tokens and batches are padded to `batch_size`
rows, so a stream of requests reuses a handful of compiled programs. TA-MoE models route by
their task router (`group="router"`, the model decides the expert group from the tokens) unless
`group="label"` (the request's task picks it, as in training).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unijax import checkpoints
from unijax.contract import BATCH_KEYS, TEXT, UND_IMAGE
from unijax.data import pipeline
from unijax.data.tokenizer import (
    DEFAULT_DATA_DIR,
    DEFAULT_TOKENIZER,
    Tokenizer,
    check_compatible,
    has_tokenizer,
    load_tokenizer,
    resolve_spec,
)
from unijax.inference import decode
from unijax.inference.images import to_uint8
from unijax.inference.sampling import Sampling
from unijax.models import family, forward

PAD_TO = 16


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def left_pad(rows: Sequence[np.ndarray], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows -> (`[B, length]` int32 left-padded with `pad_id`, mask `[B, length]` int32)."""
    tokens = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        tokens[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    return tokens, mask


def run_tokenizer_spec(ckpt) -> tuple[str, str]:
    """(`data.tokenizer`, `data.dir`) a checkpoint was trained with: the tokenizer it carries
    (`<ckpt>/tokenizer`: converted and exported checkpoints of transformers tokenizers), else that of
    the run that wrote it (`<ckpt>/../config.json`, the training config the loop writes into its
    workdir), else the defaults."""
    own = pathlib.Path(ckpt) / checkpoints.TOKENIZER_DIR
    if has_tokenizer(own):
        return str(own), DEFAULT_DATA_DIR
    path = pathlib.Path(ckpt).absolute().parent / "config.json"
    config, data = {}, {}
    if path.is_file():
        try:
            config = json.loads(path.read_text())
            data = config.get("data", {})
        except (ValueError, AttributeError) as e:
            raise ValueError(f"{path}: not a readable unijax training config ({e}); move it away to use the "
                             f"default tokenizer") from e
    spec = resolve_spec(data.get("tokenizer", DEFAULT_TOKENIZER), config.get("init_from", ""))
    return spec, data.get("dir", DEFAULT_DATA_DIR)


@dataclasses.dataclass
class Engine:
    model: object
    tokenizer: Tokenizer
    batch_size: int = 8
    ckpt: str = ""

    def __post_init__(self):
        self.cfg = self.model.cfg
        self._image_ce = None  # the jitted teacher-forced scorer, built on first use
        check_compatible(self.tokenizer, self.cfg)
        self.generator = decode.Generator(self.model)
        layout = pipeline.Layout.from_model(self.cfg, max_len=0)
        self.image_size, self.und_image = layout.image_size, layout.und_image  # the family's processor rule
        self.und_tokens = family.of(self.cfg).und_prompt_tokens(self.cfg, layout.und_tokens)

    @classmethod
    def load(cls, ckpt, *, tokenizer: str | None = None, data_dir: str | None = None, group: str = "router",
             batch_size: int = 8) -> Engine:
        """`tokenizer`: "shapes", a transformers tokenizer directory, or None for the one the run that
        wrote `ckpt` used. `group` (TA-MoE only): "router" or "label"."""
        if group not in ("router", "label"):
            raise ValueError(f"group={group!r}: expected 'router' (the task router decides) or 'label'")
        cfg = checkpoints.read_config(ckpt)
        runtime = {}
        if cfg.ffn == "ta_moe":
            runtime["moe"] = dataclasses.replace(cfg.moe, group_assignment=group)
        model = checkpoints.load_model(ckpt, **runtime)
        spec, run_dir = run_tokenizer_spec(ckpt)
        tok = load_tokenizer(tokenizer or spec, data_dir or run_dir)
        return cls(model, tok, batch_size=batch_size, ckpt=str(ckpt))

    # -- understanding -------------------------------------------------------------------------
    def _chunks(self, n: int):
        for start in range(0, n, self.batch_size):
            yield start, min(start + self.batch_size, n)

    def answer(self, images: Sequence, questions: Sequence[str], *, max_new_tokens: int = 24,
               sampling: Sampling = Sampling(), seed: int = 0) -> list[str]:
        """One answer per (image, question). An image is uint8 `[H, W, 3]`, or a list of them for a
        question whose text holds one `<image>` mark per image (in order); each is preprocessed by
        the family's processor rule (`unijax.data.images`: Janus resizes and pads to a square)."""
        if len(images) != len(questions):
            raise ValueError(f"answer: {len(images)} images but {len(questions)} questions")
        out: list[str] = []
        for lo, hi in self._chunks(len(questions)):
            prompts = [self.mmu_prompt([(q, None)], list(img) if isinstance(img, (list, tuple)) else [img])
                       for img, q in zip(images[lo:hi], questions[lo:hi])]
            batch = self.mmu_batch(prompts, self.batch_size)
            ids = self.generator.text(batch["tokens"], batch["modality"], batch["mask"], batch["pixels"],
                                      max_new_tokens=max_new_tokens, sampling=sampling, rng=jax.random.key(seed + lo))
            out += [self.decode_answer(row) for row in np.asarray(jax.device_get(ids))[: hi - lo]]
        return out

    def mmu_prompt(self, turns, images: Sequence, system_prompt: str | None = None) -> dict:
        """One understanding prompt: `turns` are `(user, assistant)` pairs ending with `(user, None)`;
        `images` (uint8 `[H, W, 3]`) go at the user texts' `<image>` marks in order (one image with no
        mark goes first). Returns `{"ids", "is_image", "pixels"}` (pixels preprocessed by the family's
        processor rule)."""
        ids, is_image, _ = self.tokenizer.mmu_ids(turns, self.und_tokens if images else 0,
                                                  system_prompt=system_prompt, num_images=max(len(images), 1))
        return {"ids": ids, "is_image": is_image, "pixels": [self.und_image(np.asarray(a, np.uint8)) for a in images]}

    def mmu_batch(self, prompts: Sequence[dict], rows: int, length: int | None = None,
                  images_per_row: int | None = None) -> dict:
        """`mmu_prompt`s -> a left-padded batch of `rows` rows (padded with copies of the first; at least
        `length` tokens, a multiple of `PAD_TO`; `images_per_row` image slots, default the most any
        prompt has, at least 1): `{"tokens", "modality", "mask", "pixels"}` device arrays."""
        prompts = list(prompts) + [prompts[0]] * (rows - len(prompts))
        length = _round_up(max([len(p["ids"]) for p in prompts] + [length or 0]), PAD_TO)
        tokens, mask = left_pad([p["ids"] for p in prompts], length, self.cfg.text.pad_token_id)
        modality, _ = left_pad([np.where(p["is_image"], UND_IMAGE, TEXT) for p in prompts], length, TEXT)
        per_row = max([len(p["pixels"]) for p in prompts] + [images_per_row or 1])
        pix = []
        for p in prompts:  # rows with fewer images repeat their last, or a blank one (never read)
            own = p["pixels"] or [self._blank()]
            pix.append(np.stack(own + [own[-1]] * (per_row - len(own))))
        pixels = np.stack(pix).astype(np.float32) / 127.5 - 1.0
        return {"tokens": jnp.asarray(tokens), "modality": jnp.asarray(modality), "mask": jnp.asarray(mask),
                "pixels": jnp.asarray(pixels)}

    def _blank(self) -> np.ndarray:
        return self.und_image(np.zeros((self.image_size, self.image_size, 3), np.uint8))

    def decode_answer(self, row) -> str:
        """Answer token ids -> text, up to the first EOS."""
        row = np.asarray(row)
        end = np.flatnonzero(row == self.cfg.text.eos_token_id)
        return self.tokenizer.decode(row[:end[0]] if len(end) else row).strip()

    # -- scoring -------------------------------------------------------------------------------
    def image_code_loss(self, images: Sequence, captions: Sequence[str]) -> list[float]:
        """Teacher-forced image-code cross-entropy (nats per code) of each (image, caption): the image
        becomes codes by the model's own VQ encoder, as in training (`pipeline.encode_sample`), and
        the codes are scored after the caption's prompt. NaN for a pair that does not fit the model."""
        if len(images) != len(captions):
            raise ValueError(f"image_code_loss: {len(images)} images but {len(captions)} captions")
        longest = max((len(self.tokenizer.t2i_ids(c)) for c in captions), default=0)
        probe = pipeline.Layout.from_model(self.cfg, max_len=1)
        layout = pipeline.Layout.from_model(self.cfg, max_len=_round_up(longest + probe.gen_tokens + 8, PAD_TO))
        if self._image_ce is None:
            graphdef, state = nnx.split(self.model)

            def ce(state, batch):
                _, logits, targets, _ = forward.lm_forward(nnx.merge(graphdef, state), batch, (0, 1))
                k = logits.shape[-1]
                logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
                nll = -jnp.take_along_axis(logp, jnp.clip(targets, 0, k - 1)[..., None], axis=-1)[..., 0]
                w = batch["image_weights"]
                return jnp.sum(nll * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1)

            self._image_ce = (jax.jit(ce), state)
        fn, state = self._image_ce
        out: list[float] = []
        for lo, hi in self._chunks(len(captions)):
            rows = [pipeline.pad_sample(pipeline.encode_sample({"task": "t2i", "image": np.asarray(img, np.uint8),
                                                                "caption": cap}, self.tokenizer, layout), layout.max_len)
                    for img, cap in zip(images[lo:hi], captions[lo:hi])]
            rows += [rows[0]] * (self.batch_size - len(rows))
            batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in BATCH_KEYS}
            losses = np.asarray(jax.device_get(fn(state, batch)))[: hi - lo]
            out += [float("nan") if r["bad"].any() else float(v) for r, v in zip(rows, losses)]
        return out

    # -- generation ----------------------------------------------------------------------------
    def images(self, prompts: Sequence[str], *, num_images: int = 4, guidance: float = 5.0,
               sampling: Sampling = Sampling(temperature=1.0), seed: int = 0,
               prompt_ids: Sequence[int] | None = None) -> np.ndarray:
        """uint8 `[len(prompts), num_images, H, W, 3]`: `num_images` samples per prompt with
        classifier-free guidance `guidance`. Sample j of prompt i draws from the key `(seed,
        prompt_ids[i], j)` (default `prompt_ids`: 0, 1, ...), whatever the batching: a prompt's images
        do not depend on the other prompts, so a resumed evaluation regenerates the same ones."""
        prompt_ids = list(range(len(prompts))) if prompt_ids is None else list(prompt_ids)
        rows = [(i, j) for i in range(len(prompts)) for j in range(num_images)]
        ids = [self.tokenizer.t2i_ids(p) for p in prompts]
        out = np.zeros((len(prompts), num_images, self.image_size, self.image_size, 3), np.uint8)
        for lo, hi in self._chunks(len(rows)):
            chunk = rows[lo:hi]
            pixels = self.image_rows([ids[i] for i, _ in chunk], [self.image_key(seed, prompt_ids[i], j) for i, j in chunk],
                                     [guidance] * len(chunk), sampling, self.batch_size)
            for (i, j), img in zip(chunk, pixels):
                out[i, j] = img
        return out

    @staticmethod
    def image_key(seed: int, prompt_id: int, sample: int):
        """The key of sample `sample` of prompt `prompt_id` (`images`)."""
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), prompt_id), sample)

    def image_rows(self, ids: Sequence, keys: Sequence, guidance: Sequence[float], sampling: Sampling | Sequence[Sampling],
                   rows: int, length: int = 0, return_load: bool = False):
        """One image per T2I prompt (token ids, `tokenizer.t2i_ids`), each with its own key and CFG
        scale, decoded as a batch of `rows` rows (padded with copies of the first) and at least `length`
        prompt tokens: uint8 `[len(ids), H, W, 3]`; with `return_load` also each row's expert
        assignments per TA-MoE layer `[L, len(ids), X]` (`decode.Generator.image_codes`). `sampling`: one
        setting (compiled in), or one per row (traced: one program serves every mix)."""
        n = len(ids)
        pad = rows - n
        ids, keys, guidance = list(ids) + [ids[0]] * pad, list(keys) + [keys[0]] * pad, list(guidance) + [guidance[0]] * pad
        row_sampling = None
        if not isinstance(sampling, Sampling):
            per = list(sampling) + [sampling[0]] * pad
            row_sampling = (jnp.asarray([s.temperature for s in per], jnp.float32), jnp.asarray([s.top_k for s in per], jnp.int32),
                            jnp.asarray([s.top_p for s in per], jnp.float32))
            sampling = Sampling()
        tokens, mask = left_pad(ids, _round_up(max(max(map(len, ids)), length), PAD_TO), self.cfg.text.pad_token_id)
        out = self.generator.image_codes(jnp.asarray(tokens), jnp.asarray(mask), guidance=np.asarray(guidance, np.float32),
                                         sampling=sampling, rng=jnp.stack(keys), return_load=return_load,
                                         row_sampling=row_sampling)
        codes = out[0] if return_load else out
        pixels = to_uint8(jax.device_get(self.generator.decode_images(codes)))[:n]
        return (pixels, np.asarray(out[1])[:, :n]) if return_load else pixels

def default_out(ckpt, name: str) -> pathlib.Path:
    """`<ckpt>/../<name>`: outputs beside the run that wrote the checkpoint."""
    return pathlib.Path(ckpt).absolute().parent / name
