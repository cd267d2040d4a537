"""grain pipelines: raw samples -> token layouts -> fixed-shape batches (the batch contract).

Raw samples (from the shapes world or `unijax.data.sources`) are dicts:
`{"task": "mmu", "image": uint8 [H, W, 3], "turns": [[user, assistant], ...]}` or
`{"task": "t2i", "image": uint8 [H, W, 3], "caption": str}`.

`encode_sample` lays one sample out as per-token arrays of length `n <= max_len`:

  tokens        int32 [n]     text ids; `image_id` at understanding slots; 0 at generated-image slots
                              (the train step fills those with VQ codes of the image)
  modality      int32 [n]     TEXT / UND_IMAGE / GEN_IMAGE (`unijax.models.janus`)
  task          int32 [n]     MMU (0) or T2I (1) for every token of the sample
  text_weights  float32 [n]   1 at position t when token t+1 is an answer token (or the eos ending it)
  image_weights float32 [n]   1 at position t when token t+1 is a generated-image code
  patches       uint8 [n, P]  the pixels under an image token: a `patch x patch x 3` block of the
                              preprocessed image (`Layout.und_image` / `gen_image`), row-major (understanding: the vision patch; generation:
                              the VQ downsampling block), zero elsewhere
  bad           int32 [n]     1 on the single token of a skipped bad record

`pad_sample` pads to `max_len` and adds `segment_ids` (1 on the sample, 0 on padding) and
`positions`; packing (`data.packing`) puts several samples in a row with grain's first-fit packer,
which numbers the segments and restarts positions per sample. Carrying pixels per token is what
lets images pack like any other feature; the train step reassembles whole images from them
(`unijax.models.image_inputs.gather_images`).

A batch is the dict of these arrays stacked to `[batch, max_len(, P)]`, plus `kind [batch]` (the
question kind index, -1 when unknown) when rows are not packed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from unijax.contract import BATCH_KEYS, GEN_IMAGE, MMU, SEQ_FEATURES, TASK_IDS, TEXT, UND_IMAGE
from unijax.data.images import ImageRule
from unijax.models import family

log = logging.getLogger(__name__)


OVERFLOW_POLICIES = ("skip", "truncate", "error")
BAD_RECORD, OVERFLOW = 1, 2  # values of a skipped sample's `bad` flag: a bad record, a sample too long
SKIP_KINDS = {BAD_RECORD: "bad_record", OVERFLOW: "overflow"}
_REASONS_LOGGED = 5  # the first reasons for skipped samples go to the log (per process)
_logged = {"n": 0}


def _log_skip(where: str, reason: str):
    if _logged["n"] < _REASONS_LOGGED:
        _logged["n"] += 1
        log.warning("skipped %s: %s%s", where, reason,
                    " (further skips are only counted)" if _logged["n"] == _REASONS_LOGGED else "")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static sizes of a token layout, derived from the model config."""

    max_len: int
    image_size: int
    und_patch: int      # vision patch size: one understanding token per und_patch^2 pixels
    gen_patch: int      # VQ downsampling factor: one generated-image token per gen_patch^2 pixels
    cfg_drop_prob: float = 0.0
    pad_id: int = 0
    bos_id: int = 1
    boi_id: int = 4
    eol_id: int = -1    # >= 0: Emu3's end-of-line id, after every row of image tokens
    und_rule: str = "janus"  # how an understanding image becomes square (`unijax.data.images`)
    overflow: str = "skip"   # a sample longer than max_len: OVERFLOW_POLICIES
    max_images: int = 1      # understanding images per conversation (more: data.overflow)
    und_images: bool = True  # False: no understanding images in the data (text-only conversations)
    gen_images: bool = True  # False: no generated images in the data (no generation samples)

    @classmethod
    def from_model(cls, cfg, max_len: int, cfg_drop_prob: float = 0.0, overflow: str = "skip",
                   max_images: int = 1) -> Layout:
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"data.overflow={overflow!r}: expected one of {OVERFLOW_POLICIES}")
        if max_images < 1:
            raise ValueError(f"data.max_images={max_images} must be >= 1")
        return dataclasses.replace(cls._from_model(cfg, max_len, cfg_drop_prob), overflow=overflow,
                                   max_images=int(max_images))

    @classmethod
    def for_data(cls, cfg, data) -> Layout:
        """The layout of model config `cfg` for the `data.*` config group. Data without images of a
        kind (shapes scenes in words, `data.scene_text`; no generation samples, `data.gen_ratio=0`)
        lets the train step skip that image encoder (`images_per_row`)."""
        layout = cls.from_model(cfg, data.max_len, data.cfg_drop_prob, data.overflow, data.max_images)
        scene_text = data.source == "shapes" and bool(data.get("scene_text", False))
        return dataclasses.replace(layout, und_images=not scene_text, gen_images=float(data.gen_ratio) > 0)

    @classmethod
    def _from_model(cls, cfg, max_len: int, cfg_drop_prob: float) -> Layout:
        images = family.of(cfg).image_layout(cfg)
        return cls(max_len=max_len, cfg_drop_prob=cfg_drop_prob, pad_id=cfg.text.pad_token_id,
                   bos_id=cfg.text.bos_token_id, **dataclasses.asdict(images))

    @property
    def und_image(self) -> ImageRule:
        """Understanding images: the family's processor rule (`janus`: resize + pad; `emu3`)."""
        return ImageRule(self.und_rule, self.image_size, self.und_patch)

    @property
    def gen_image(self) -> ImageRule:
        """Generated-image targets: a centre crop for every family (no padding bars to learn)."""
        return ImageRule("crop", self.image_size, self.gen_patch)

    @property
    def und_tokens(self) -> int:
        return (self.image_size // self.und_patch) ** 2

    @property
    def gen_tokens(self) -> int:
        return (self.image_size // self.gen_patch) ** 2

    @property
    def row_ends(self) -> bool:
        """Emu3 layout: an end-of-line token after each row of image tokens (both directions)."""
        return self.eol_id >= 0

    def image_slots(self, n_tokens: int) -> int:
        """Sequence slots of an image of `n_tokens` tokens (with its end-of-line tokens)."""
        return n_tokens + (int(round(n_tokens ** 0.5)) if self.row_ends else 0)

    @property
    def patch_dim(self) -> int:
        return max(self.und_patch, self.gen_patch) ** 2 * 3

    def images_per_row(self, packing: bool) -> tuple[int, int]:
        """Static (understanding, generated) image slots per row the train step reassembles (0: the
        data has no images of that kind, and the step runs no encoder for them)."""
        fit = max(1, self.max_len // (self.image_slots(self.und_tokens) + 2))
        if not packing:
            und, gen = min(self.max_images, fit), 1
        else:
            und, gen = fit, max(1, self.max_len // (self.image_slots(self.gen_tokens) + 2))
        return und if self.und_images else 0, gen if self.gen_images else 0


_DTYPES = {"tokens": np.int32, "modality": np.int32, "task": np.int32, "text_weights": np.float32,
           "image_weights": np.float32, "patches": np.uint8, "bad": np.int32, "segment_ids": np.int32,
           "positions": np.int32}


def batch_spec(layout: Layout, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """`{key: (shape, dtype)}` of the `BATCH_KEYS` arrays of a `[batch_size, max_len]` batch: what
    the train step is compiled for (`unijax.plan` lowers it without building a batch)."""
    out = {}
    for key in BATCH_KEYS:
        shape = (batch_size, layout.max_len) + ((layout.patch_dim,) if key == "patches" else ())
        out[key] = (shape, np.dtype(_DTYPES[key]))
    return out


def image_patches(image: np.ndarray, patch: int, dim: int) -> np.ndarray:
    """uint8 `[S, S, 3]` -> `[(S/patch)^2, dim]`: row-major patches, each `patch x patch x 3`, zero-padded."""
    s = image.shape[0]
    g = s // patch
    p = image.reshape(g, patch, g, patch, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, patch * patch * 3)
    return np.pad(p, ((0, 0), (0, dim - p.shape[1])))


def _shifted(flags: np.ndarray) -> np.ndarray:
    """weights[t] = flags[t + 1] (the loss at t predicts token t + 1); the last position gets none."""
    out = np.zeros(flags.shape, np.float32)
    out[:-1] = flags[1:]
    return out


def _insert_row_ends(layout: Layout, is_image: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Emu3 layout: after every row (`sqrt(n)` consecutive image tokens) an end-of-line token, a
    TEXT token with no loss; `arrays` get the end-of-line id (the first, the ids) or zero."""
    where = np.flatnonzero(is_image)
    grid = int(round(layout.gen_tokens ** 0.5))  # Emu3: one VQ grid for every image, both directions
    after = where[grid - 1::grid] + 1
    ids, *rest = arrays
    return (np.insert(ids, after, layout.eol_id).astype(ids.dtype),
            *(np.insert(a, after, 0).astype(a.dtype) for a in rest))


def bad_sample(layout: Layout, task: int = MMU, why: int = BAD_RECORD, sample: dict | None = None,
               reason: str = "") -> dict[str, np.ndarray]:
    """The stand-in for a skipped sample: one padding token flagged `bad` (= `why`: BAD_RECORD or
    OVERFLOW, counted apart in the metrics), no loss; `skip` names the record (`skipped_in`)."""
    sample = sample or {}
    skip = json.dumps({"source": str(sample.get("source", "")), "index": int(sample.get("index", -1)),
                       "why": SKIP_KINDS[why], "reason": reason})
    return {"tokens": np.array([layout.pad_id], np.int32), "modality": np.zeros(1, np.int32),
            "task": np.full(1, task, np.int32), "text_weights": np.zeros(1, np.float32),
            "image_weights": np.zeros(1, np.float32), "patches": np.zeros((1, layout.patch_dim), np.uint8),
            "bad": np.full(1, why, np.int32), "kind": np.int32(-1), "skip": skip, "origin": origin_of(sample)}


def origin_of(sample: dict) -> str:
    """`task:source:index`, the record a sample came from ("" when it does not say)."""
    if "source" not in sample or "index" not in sample:
        return ""
    return f"{sample.get('task', '')}:{sample['source']}:{sample['index']}"


def distinct_rows(batches: list[dict]) -> list[dict]:
    """The batches with every repeat of a record (a held-out file smaller than the batches asked for
    comes round again) blanked to an empty row, which no statistic counts: each record is one sample."""
    seen: set[str] = set()
    out = []
    for b in batches:
        b = {k: np.array(v) for k, v in b.items()}
        for r, origin in enumerate(np.asarray(b.get("origin", ())).reshape(-1)):
            if origin and origin in seen:
                for key in ("segment_ids", "text_weights", "image_weights", "modality", "tokens", "bad"):
                    b[key][r] = 0
            seen.add(str(origin))
        out.append(b)
    return out


def skipped_in(batch: dict) -> list[dict]:
    """The skipped records of a host batch: `{"source", "index", "why", "reason"}` each, one per
    skipped sample (a packed row holds several; a record skipped in two batches appears in both)."""
    return [json.loads(line) for s in np.asarray(batch.get("skip", ())).reshape(-1) for line in str(s).splitlines()
            if line]


def encode_sample(sample: dict[str, Any], tokenizer, layout: Layout, rng: np.random.Generator | None = None,
                  kinds: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """One raw sample -> per-token arrays (see the module docstring). A sample longer than
    `layout.max_len` follows `layout.overflow`: `skip` (a bad sample flagged OVERFLOW), `truncate`
    (a conversation drops its last turns until it fits; skipped when even the first does not;
    a caption is skipped) or `error`."""
    where = f"{sample.get('source', 'sample')}: record {sample.get('index', '?')}"
    if sample.get("bad"):
        _log_skip(where, sample.get("reason", "bad record"))
        return bad_sample(layout, TASK_IDS.get(sample.get("task"), MMU), BAD_RECORD, sample,
                          sample.get("reason", "bad record"))
    n_images = len(sample.get("images") or ())
    if n_images > layout.max_images:
        return _overflowed(layout, sample, "mmu", f"{n_images} images, more than data.max_images={layout.max_images}",
                           "raise data.max_images or set data.overflow=skip")
    x = _encode(sample, tokenizer, layout, rng, kinds, where)
    if len(x["tokens"]) <= layout.max_len:
        return {**x, "skip": "", "origin": origin_of(sample)}
    n, task = len(x["tokens"]), sample["task"]
    if layout.overflow == "truncate" and task == "mmu":
        turns = list(sample["turns"])
        while len(turns) > 1:
            turns.pop()
            x = _encode({**sample, "turns": turns}, tokenizer, layout, rng, kinds, where)
            if len(x["tokens"]) <= layout.max_len:
                return {**x, "skip": "", "origin": origin_of(sample)}
    return _overflowed(layout, sample, task, f"{n} tokens do not fit data.max_len={layout.max_len}",
                       "raise data.max_len, shorten the text, or set data.overflow=skip / truncate")


def _overflowed(layout: Layout, sample: dict, task: str, reason: str, fix: str) -> dict[str, np.ndarray]:
    """A sample that does not fit: an error naming it (`data.overflow=error`), else skipped and counted."""
    where = f"{sample.get('source', 'sample')}: record {sample.get('index', '?')}"
    if layout.overflow == "error":
        raise ValueError(f"{where}: {reason}; {fix}")
    _log_skip(where, f"{reason} (data.overflow={layout.overflow})")
    return bad_sample(layout, TASK_IDS[task], OVERFLOW, sample, reason)


def _encode(sample, tokenizer, layout: Layout, rng, kinds, where: str) -> dict[str, np.ndarray]:
    task = sample["task"]
    images = [np.asarray(a, np.uint8) for a in sample.get("images") or ()]
    if not images and sample.get("image") is not None:
        images = [np.asarray(sample["image"], np.uint8)]
    image = images[0] if images else None
    if image is None and task != "mmu":
        raise ValueError(f"{where}: a {task} sample needs an image")
    dim = layout.patch_dim
    if task == "mmu":  # a text-only conversation has no image slots; several images sit at their marks
        ids, is_image, is_answer = tokenizer.mmu_ids(sample["turns"], layout.und_tokens if images else 0,
                                                     num_images=len(images))
        ids, is_image, is_answer = (np.asarray(ids, np.int32), np.asarray(is_image, bool),
                                    np.asarray(is_answer, np.float32))
        if layout.row_ends:
            ids, is_image, is_answer = _insert_row_ends(layout, is_image, ids, is_image, is_answer)
        modality = np.where(is_image, UND_IMAGE, TEXT).astype(np.int32)
        patches = np.zeros((len(ids), dim), np.uint8)
        if images:
            patches[is_image] = np.concatenate([image_patches(layout.und_image(a), layout.und_patch, dim)
                                                for a in images])
        text_w, image_w = _shifted(is_answer), np.zeros(len(ids), np.float32)
    elif task == "t2i":
        prompt = np.asarray(tokenizer.t2i_ids(sample["caption"]), np.int32)
        if rng is not None and layout.cfg_drop_prob > 0 and rng.random() < layout.cfg_drop_prob:
            # Janus-Pro's null prompt for classifier-free guidance (inference.decode.unconditional_prompt)
            keep = (prompt == layout.bos_id) | (prompt == layout.boi_id)
            prompt = np.where(keep, prompt, layout.pad_id).astype(np.int32)
        n_img = layout.gen_tokens
        ids = np.concatenate([prompt, np.zeros(n_img, np.int32), [tokenizer.eoi_id]]).astype(np.int32)
        is_gen = np.zeros(len(ids), bool)
        is_gen[len(prompt):len(prompt) + n_img] = True
        if layout.row_ends:
            ids, is_gen = _insert_row_ends(layout, is_gen, ids, is_gen)
        modality = np.where(is_gen, GEN_IMAGE, TEXT).astype(np.int32)
        patches = np.zeros((len(ids), dim), np.uint8)
        patches[is_gen] = image_patches(layout.gen_image(image), layout.gen_patch, dim)
        text_w, image_w = np.zeros(len(ids), np.float32), _shifted(is_gen.astype(np.float32))
    else:
        raise ValueError(f"{where}: unknown task {task!r} (expected 'mmu' or 't2i')")
    kind = sample.get("kind")
    return {"tokens": ids, "modality": modality, "task": np.full(len(ids), TASK_IDS[task], np.int32),
            "text_weights": text_w, "image_weights": image_w, "patches": patches,
            "bad": np.zeros(len(ids), np.int32),
            "kind": np.int32(kinds.index(kind) if kind in kinds else -1)}


def pad_sample(x: dict[str, np.ndarray], max_len: int) -> dict[str, np.ndarray]:
    """Pads the per-token arrays to `max_len`; adds `segment_ids` and `positions`."""
    n = len(x["tokens"])
    out = {k: np.pad(x[k], [(0, max_len - n)] + [(0, 0)] * (x[k].ndim - 1)) for k in SEQ_FEATURES}
    out["segment_ids"] = (np.arange(max_len) < n).astype(np.int32)
    out["positions"] = np.where(np.arange(max_len) < n, np.arange(max_len), 0).astype(np.int32)
    out["kind"] = x["kind"]
    out["skip"] = x.get("skip", "")
    out["origin"] = x.get("origin", "")
    return out


class EncodeSample(grain.transforms.RandomMap):
    """grain transform: raw sample -> per-token arrays (random only for the CFG prompt drop)."""

    def __init__(self, tokenizer, layout: Layout, kinds: Sequence[str] = ()):
        self.tokenizer, self.layout, self.kinds = tokenizer, layout, tuple(kinds)

    def random_map(self, sample, rng: np.random.Generator):
        return encode_sample(sample, self.tokenizer, self.layout, rng, self.kinds)


READ_THREADS, READ_AHEAD = 4, 4  # `data.read_threads`, `data.read_ahead` (grain's own defaults: 16 and 500)


def batches(datasets: Sequence[grain.MapDataset], weights: Sequence[float], *, tokenizer, layout: Layout,
            batch_size: int, seed: int, packing: bool = False, num_workers: int = 0, prefetch: int = 0,
            kinds: Sequence[str] = (), process_index: int = 0, process_count: int = 1,
            read_threads: int = READ_THREADS, read_ahead: int = READ_AHEAD,
            encoder: grain.transforms.RandomMap | None = None) -> grain.IterDataset:
    """Mixes per-task datasets of raw samples into batches of `batch_size` rows for this process.

    `datasets` are random-access datasets of raw samples, already shuffled and repeated where they
    are finite (`repeat_epochs`); the shapes world is effectively infinite. The mixed stream (and
    each sample's random draws) is deterministic in `seed` and the sample's global index. Global
    batch b is samples `[b G, (b + 1) G)` with G = `batch_size * process_count`, and process p's
    rows are its block `[b G + p L, b G + (p + 1) L)` (L = `batch_size`): the processes' batches,
    stacked in process order, are exactly the one-process global batch (without packing, which
    forms rows per process).

    Memory is bounded: `read_threads` threads decode ahead at most `read_ahead` elements (batches;
    samples when packing) per process, and each worker process keeps one batch ready.

    `encoder`: a training objective's own sample -> padded row transform (its batch fields,
    `Objective.encoder`), instead of the batch contract's `EncodeSample` + padding; not packed.
    """
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_ahead)
    mixed = grain.MapDataset.mix(list(datasets), list(weights)) if len(datasets) > 1 else datasets[0]
    ds = mixed.random_map(encoder or EncodeSample(tokenizer, layout, kinds), seed=seed)
    if process_count > 1:
        ds = grain.MapDataset.source(ProcessRows(ds, batch_size, process_index, process_count))
    if encoder is not None:
        if packing:
            raise ValueError(f"data.packing=True: {type(encoder).__name__} makes its own rows, which do not pack")
        it = ds.batch(batch_size, drop_remainder=True).to_iter_dataset(read)
    elif packing:
        it = ds.map(lambda x: {**{k: x[k] for k in SEQ_FEATURES}, "skip": x.get("skip", "")}).to_iter_dataset(read)
        it = grain.experimental.FirstFitPackIterDataset(
            it, length_struct=dict.fromkeys(SEQ_FEATURES, layout.max_len), num_packing_bins=batch_size,
            shuffle_bins=False, meta_features=["skip"])
        it = it.map(_rename_packed).batch(batch_size, drop_remainder=True)
    else:
        it = ds.map(lambda x: pad_sample(x, layout.max_len)).batch(batch_size, drop_remainder=True).to_iter_dataset(read)
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    elif prefetch > 0:  # a background thread prepares the next batches while the step runs
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch)
    return it


class ProcessRows:
    """Random access to process p's samples: local index j -> global index `(j // L) G + p L + j % L`."""

    def __init__(self, ds, rows: int, process_index: int, process_count: int):
        self.ds, self.rows, self.p, self.n = ds, rows, process_index, process_count

    def __len__(self) -> int:
        return len(self.ds) // self.n

    def __getitem__(self, j: int):
        b, r = divmod(int(j), self.rows)
        return self.ds[b * self.rows * self.n + self.p * self.rows + r]


def _rename_packed(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {k: x[k] for k in SEQ_FEATURES}
    out["segment_ids"] = x["tokens_segment_ids"].astype(np.int32)
    out["positions"] = x["tokens_positions"].astype(np.int32)
    out["skip"] = "\n".join(s for s in x["skip"] if s)  # the row's skipped records, one JSON line each
    return out


def repeat_epochs(ds: grain.MapDataset, seed: int) -> grain.MapDataset:
    """A finite dataset reshuffled every epoch and repeated forever (index space ~ 2^31)."""
    return ds.shuffle(seed=seed).repeat(max(1, (2 ** 31 - 1) // max(1, len(ds))))


def tokens_in(batch: dict[str, np.ndarray]) -> int:
    """Non-padding tokens in a batch (for tokens/s)."""
    return int(np.sum(batch["segment_ids"] > 0))
