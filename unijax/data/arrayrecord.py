"""ArrayRecord files of raw samples: a reader source, a writer and a converter.

Records are msgpack-encoded dicts with the image as encoded PNG/JPEG bytes (the format is
described in `unijax.data.sources`): `{"task": "mmu", "image": <bytes>, "turns": [[u, a], ...]}`,
`{"task": "t2i", "image": <bytes>, "caption": str}`, or a preference pair
(`unijax.data.preference`) `{"task": "pref", "pair": "mmu" | "t2i", "chosen": <record bytes>,
"rejected": <record bytes>}` whose sides are records of the first two kinds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import grain
import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from unijax.contract import TASKS
from unijax.data import preference
from unijax.data.records import (
    DEFAULT_LIMITS,
    MAX_IMAGES_PER_RECORD,
    MAX_RECORD_BYTES,
    BadRecordError,
    ImageLimits,
    SkippedRecords,
    decode_image_bytes,
    encode_png,
    is_bad,
    normalise_index,
    skip_bad,
)
from unijax.data.sources import open_source
from unijax.io import atomic_file

log = logging.getLogger(__name__)
PREF = "pref"  # the task key of preference-pair files (`pack --pref`, `data.pref_arrayrecord`)


def _check_turns(turns: Any) -> list[list[str]]:
    if not isinstance(turns, (list, tuple)) or not turns:
        raise ValueError(f"'turns' must be a non-empty list of [user, assistant] pairs, got {turns!r:.80}")
    out = []
    for k, t in enumerate(turns):
        if not isinstance(t, (list, tuple)) or len(t) != 2 or not all(isinstance(s, str) for s in t):
            raise ValueError(f"turn {k} must be a [user, assistant] pair of strings, got {t!r:.80}")
        out.append([t[0], t[1]])
    return out


class ArrayRecordSource:
    """MMU and/or T2I raw samples from ArrayRecord files of msgpack dicts.

    Args:
      paths: one path or a list of paths; records are numbered across the
        files in the given order.

    Uses ``grain.sources.ArrayRecordDataSource`` (one per file, readers opened
    lazily in each process). A sample's ``source`` is its file and ``index`` its
    position inside that file. Files may mix MMU and T2I records, so the
    source-level ``task`` is None (a bad record's marker still carries the
    record's own task when it could be read).
    """

    task = None

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], limits: ImageLimits = DEFAULT_LIMITS):
        self.limits = limits
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [os.fspath(p) for p in paths]
        if not self.paths:
            raise ValueError("ArrayRecordSource needs at least one path")
        for p in self.paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"ArrayRecord file {p!r} not found")
        self._sources = []
        for p in self.paths:
            try:
                self._sources.append(grain.sources.ArrayRecordDataSource(p))
            except Exception as e:
                raise ValueError(f"{p}: cannot open as an ArrayRecord file ({type(e).__name__}: {e})") from None
        self._ends = np.cumsum([len(s) for s in self._sources]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __repr__(self) -> str:
        return f"ArrayRecordSource(paths={self.paths!r}, len={len(self)})"

    def _locate(self, index: int) -> tuple[int, int]:
        i = normalise_index(index, len(self), ", ".join(self.paths))
        f = int(np.searchsorted(self._ends, i, side="right"))
        return f, i - (int(self._ends[f - 1]) if f else 0)

    def __getitem__(self, index: int) -> dict:
        f, i = self._locate(index)
        return self._decode(self._sources[f][i], self.paths[f], i)

    def _decode(self, raw: bytes, name: str, i: int, pair_side: bool = False) -> dict:
        try:
            rec = msgpack.unpackb(raw, raw=False)
        except Exception as e:
            raise BadRecordError(name, i, f"record is not valid msgpack ({type(e).__name__}: {e})") from None
        if not isinstance(rec, dict):
            raise BadRecordError(name, i, f"record is a msgpack {type(rec).__name__}, expected a map")
        task = rec.get("task")
        if task == PREF and not pair_side:
            if rec.get("pair") not in TASKS or not all(isinstance(rec.get(s), bytes) for s in preference.SIDES):
                raise BadRecordError(name, i, "a preference record needs 'pair' (mmu / t2i) and the bytes of both "
                                     "'chosen' and 'rejected'", PREF)
            sides = {s: self._decode(rec[s], name, i, pair_side=True) for s in preference.SIDES}
            if any(side["task"] != rec["pair"] for side in sides.values()):
                raise BadRecordError(name, i, f"a {rec['pair']} pair holds a side of another task", PREF)
            return {"task": rec["pair"], **sides, "source": name, "index": i}
        if task not in TASKS:
            raise BadRecordError(name, i, f"unknown task {task!r}; expected one of {TASKS + (PREF,)}")
        images = rec.get("images") if isinstance(rec.get("images"), list) else [rec.get("image")]
        if len(images) > MAX_IMAGES_PER_RECORD:
            raise BadRecordError(name, i, f"{len(images)} images, more than {MAX_IMAGES_PER_RECORD} a record may hold", task)
        text = len(raw) - sum(len(b) for b in images if isinstance(b, (bytes, bytearray)))
        if text > MAX_RECORD_BYTES:
            raise BadRecordError(name, i, f"record holds {text:,} bytes besides its images, more than "
                                 f"{MAX_RECORD_BYTES:,}; split it or shorten it", task)
        if "image" not in rec and task == "t2i":
            raise BadRecordError(name, i, "record has no 'image' bytes", task)
        if task == "mmu":  # no "image" (or None): a text-only conversation; "images": several
            try:
                turns = _check_turns(rec.get("turns"))
            except ValueError as e:
                raise BadRecordError(name, i, str(e), task) from None
            if isinstance(rec.get("images"), list) and len(rec["images"]) > 1:
                images = [decode_image_bytes(b, name, i, task, limits=self.limits) for b in rec["images"]]
                return {"task": "mmu", "images": images, "turns": turns, "source": name, "index": i}
            one = rec["images"][0] if isinstance(rec.get("images"), list) and rec["images"] else rec.get("image")
            image = None if one is None else decode_image_bytes(one, name, i, task, limits=self.limits)
            return {"task": "mmu", "image": image, "turns": turns, "source": name, "index": i}
        caption = rec.get("caption")
        if not isinstance(caption, str):
            raise BadRecordError(name, i, f"'caption' must be a string, got {caption!r:.80}", task)
        image = decode_image_bytes(rec["image"], name, i, task, limits=self.limits)
        return {"task": "t2i", "image": image, "caption": caption, "source": name, "index": i}


def _image_bytes(image) -> bytes:
    """Encoded bytes as they are (a source read with `keep_bytes`), an array as PNG (lossless)."""
    return bytes(image) if isinstance(image, (bytes, bytearray, memoryview)) else encode_png(image)


def encode_record(sample: dict) -> bytes:
    """msgpack-encodes one raw sample for an ArrayRecord file (images as their original bytes, or
    arrays as PNG).

    Only the task, image and text are stored; ``source``/``index`` are not. A preference pair
    (``chosen`` and ``rejected`` samples) is stored with both sides encoded.
    Raises ``ValueError`` for bad-record markers and malformed samples.
    """
    if is_bad(sample):
        raise ValueError(f"cannot write a bad-record marker ({sample.get('source')}: record {sample.get('index')})")
    task = sample.get("task")
    if all(s in sample for s in preference.SIDES):
        return msgpack.packb({"task": PREF, "pair": task, **{s: encode_record(sample[s]) for s in preference.SIDES}},
                             use_bin_type=True)
    if task == "mmu" and sample.get("images"):
        rec = {"task": "mmu", "images": [_image_bytes(a) for a in sample["images"]],
               "turns": _check_turns(sample.get("turns"))}
    elif task == "mmu":
        image = None if sample.get("image") is None else _image_bytes(sample["image"])
        rec = {"task": "mmu", "image": image, "turns": _check_turns(sample.get("turns"))}
    elif task == "t2i":
        caption = sample.get("caption")
        if not isinstance(caption, str):
            raise ValueError(f"t2i sample 'caption' must be a string, got {caption!r:.80}")
        rec = {"task": "t2i", "image": _image_bytes(sample["image"]), "caption": caption}
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return msgpack.packb(rec, use_bin_type=True)


def write_arrayrecord(path: str | os.PathLike, samples: Iterable[dict]) -> int:
    """Writes raw samples (see the module docstring) to one ArrayRecord file.

    Images are PNG-encoded (lossless, so reading back gives identical pixels).
    The file is written with ``group_size:1`` for fast random access. Returns the
    number of records written. Raises ``ValueError`` on a malformed sample or a
    bad-record marker (nothing half-written is left behind).
    """
    path = os.fspath(path)
    n = 0
    with atomic_file(path) as tmp:
        writer = ArrayRecordWriter(os.fspath(tmp), "group_size:1")
        try:
            for k, sample in enumerate(samples):
                try:
                    writer.write(encode_record(sample))
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}: sample {k} cannot be written: {e}") from None
                n += 1
        finally:
            writer.close()
    return n


def _write_good(path: str | os.PathLike, samples: Iterable[dict]) -> tuple[int, list[dict]]:
    """Writes the samples that are not bad-record markers to one ArrayRecord file ->
    (records written, the markers left out)."""
    skipped: list[dict] = []

    def good():
        for s in samples:
            if is_bad(s):
                skipped.append(s)
                continue
            yield s

    return write_arrayrecord(path, good()), skipped


def convert_to_arrayrecord(source: Any, path: str | os.PathLike, *, skip_bad_records: bool = False) -> int:
    """Writes every sample of ``source`` (any source here) into one ArrayRecord file.

    Example: ``convert_to_arrayrecord(LlavaSource("llava.json", "images/"), "llava.arrayrecord")``.
    With ``skip_bad_records`` bad records are left out (and logged) instead of
    raising :class:`BadRecordError`. Returns the number of records written.
    """
    src = skip_bad(source, skip_bad_records)
    n, skipped = _write_good(path, (src[k] for k in range(len(src))))
    if skipped:
        log.warning("convert_to_arrayrecord: skipped %d bad records of %r (first: %s: record %d: %s)",
                    len(skipped), source, skipped[0]["source"], skipped[0]["index"], skipped[0]["reason"])
    return n


# -- packing user data into shards ------------------------------------------------------------------

PACK_INDEX = "index.json"


def _fingerprint(files: dict[str, list[str]], records_per_shard: int) -> dict:
    """What a pack depends on: every input file's path, size and content hash (SHA-256), and the shard
    size (a touched but unchanged file still resumes; a changed one of the same size does not)."""
    out = {"records_per_shard": int(records_per_shard), "files": {}}
    for task, paths in files.items():
        out["files"][task] = [[os.path.abspath(p), os.path.getsize(p), _sha256(p)] for p in paths]
    return out


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def pack(files: dict[str, list[str]], image_roots: dict[str, str], out: str | os.PathLike, *,
         records_per_shard: int = 10000, skip_bad_records: bool = True, overwrite: bool = False,
         progress=None) -> dict:
    """Writes each task's files (`{"mmu": [.json / .jsonl], "t2i": [.jsonl / .parquet]}`) as ArrayRecord
    shards `<out>/<task>-SSSSS-of-NNNNN.arrayrecord` of `records_per_shard` input records each, the
    images' original encoded bytes kept (no re-encoding), bad records skipped (counted, the first
    reasons logged) unless `skip_bad_records=False`.

    `<out>/index.json` lists every finished shard with its record count and skips, rewritten after
    each shard: a rerun of the same command resumes at the first unfinished shard (a shard is
    written whole or not at all); other inputs or shard size than the index's need `overwrite`.
    `progress(done, total)` is called with input records. Returns the index.
    """
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    files = {t: list(p) for t, p in files.items() if p}
    for task in files:
        if task not in TASKS + (PREF,):
            raise ValueError(f"pack: unknown task {task!r}; expected one of {TASKS + (PREF,)}")
    fingerprint = _fingerprint(files, records_per_shard)
    index_path = os.path.join(out, PACK_INDEX)
    index = {"fingerprint": fingerprint, "shards": {}}
    if os.path.exists(index_path) and not overwrite:
        with open(index_path) as f:
            old = json.load(f)
        if old.get("fingerprint") != fingerprint:
            raise ValueError(f"{index_path}: packed from other inputs or another shard size; pass --overwrite "
                             f"(or another --out) to pack these")
        index = old
    # per task, its files' records in order (one random-access dataset over all of them)
    def opened(path, task):
        if task == PREF:
            return preference.PreferenceJsonl(path, image_roots.get(task, ""), keep_bytes=True)
        return open_source(path, image_roots.get(task, ""), task, keep_bytes=True)

    records = {t: grain.MapDataset.concatenate([
        grain.MapDataset.source(skip_bad(opened(p, t), skip_bad_records)) for p in paths]) for t, paths in files.items()}
    total = sum(len(r) for r in records.values())
    done = sum(v["inputs"] for v in index["shards"].values())
    for task, task_records in records.items():
        n_shards = max(1, -(-len(task_records) // records_per_shard))
        for k in range(n_shards):
            name = f"{task}-{k:05d}-of-{n_shards:05d}.arrayrecord"
            if name in index["shards"]:
                continue
            chunk = range(k * records_per_shard, min((k + 1) * records_per_shard, len(task_records)))
            n, skipped = _write_good(os.path.join(out, name), (task_records[i] for i in chunk))
            index["shards"][name] = {"task": task, "records": n, "skipped": len(skipped), "inputs": len(chunk),
                                     "skipped_records": [{"source": b["source"], "index": b["index"], "why": "bad_record",
                                                          "reason": b["reason"]} for b in skipped]}
            with atomic_file(index_path) as tmp:
                with open(tmp, "w") as f:
                    json.dump(index, f, indent=2)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    skips = SkippedRecords()
    for shard in index["shards"].values():
        skips.add(shard.get("skipped_records", ()), split=shard["task"])
    if skips.records:
        skips.write(pathlib.Path(out) / "skipped.jsonl")
    index["skipped_summary"] = skips.summary()
    return index
