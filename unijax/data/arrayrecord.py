"""ArrayRecord files of raw samples: a reader source, a writer and a converter.

Records are msgpack-encoded dicts with the image as encoded PNG/JPEG bytes (the format is
described in `unijax.data.sources`): `{"task": "mmu", "image": <bytes>, "turns": [[u, a], ...]}` or
`{"task": "t2i", "image": <bytes>, "caption": str}`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import grain
import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from unijax.contract import TASKS
from unijax.data.sources import BadRecordError, _decode_image_bytes, _normalise_index, encode_png, is_bad, log, skip_bad
from unijax.io import atomic_file


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

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]):
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
        i = _normalise_index(index, len(self), ", ".join(self.paths))
        f = int(np.searchsorted(self._ends, i, side="right"))
        return f, i - (int(self._ends[f - 1]) if f else 0)

    def __getitem__(self, index: int) -> dict:
        f, i = self._locate(index)
        name = self.paths[f]
        try:
            rec = msgpack.unpackb(self._sources[f][i], raw=False)
        except Exception as e:
            raise BadRecordError(name, i, f"record is not valid msgpack ({type(e).__name__}: {e})") from None
        if not isinstance(rec, dict):
            raise BadRecordError(name, i, f"record is a msgpack {type(rec).__name__}, expected a map")
        task = rec.get("task")
        if task not in TASKS:
            raise BadRecordError(name, i, f"unknown task {task!r}; expected one of {TASKS}")
        if "image" not in rec and task == "t2i":
            raise BadRecordError(name, i, "record has no 'image' bytes", task)
        if task == "mmu":  # no "image" (or None): a text-only conversation
            try:
                turns = _check_turns(rec.get("turns"))
            except ValueError as e:
                raise BadRecordError(name, i, str(e), task) from None
            image = None if rec.get("image") is None else _decode_image_bytes(rec["image"], name, i, task)
            return {"task": "mmu", "image": image, "turns": turns, "source": name, "index": i}
        caption = rec.get("caption")
        if not isinstance(caption, str):
            raise BadRecordError(name, i, f"'caption' must be a string, got {caption!r:.80}", task)
        image = _decode_image_bytes(rec["image"], name, i, task)
        return {"task": "t2i", "image": image, "caption": caption, "source": name, "index": i}


def encode_record(sample: dict) -> bytes:
    """msgpack-encodes one raw sample for an ArrayRecord file (image as PNG).

    Only the task, image and text are stored; ``source``/``index`` are not.
    Raises ``ValueError`` for bad-record markers and malformed samples.
    """
    if is_bad(sample):
        raise ValueError(f"cannot write a bad-record marker ({sample.get('source')}: record {sample.get('index')})")
    task = sample.get("task")
    if task == "mmu":
        image = None if sample.get("image") is None else encode_png(sample["image"])
        rec = {"task": "mmu", "image": image, "turns": _check_turns(sample.get("turns"))}
    elif task == "t2i":
        caption = sample.get("caption")
        if not isinstance(caption, str):
            raise ValueError(f"t2i sample 'caption' must be a string, got {caption!r:.80}")
        rec = {"task": "t2i", "image": encode_png(sample["image"]), "caption": caption}
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


def convert_to_arrayrecord(source: Any, path: str | os.PathLike, *, skip_bad_records: bool = False) -> int:
    """Writes every sample of ``source`` (any source here) into one ArrayRecord file.

    Example: ``convert_to_arrayrecord(LlavaSource("llava.json", "images/"), "llava.arrayrecord")``.
    With ``skip_bad_records`` bad records are left out (and logged) instead of
    raising :class:`BadRecordError`. Returns the number of records written.
    """
    src = skip_bad(source, skip_bad_records)
    skipped = []

    def good():
        for k in range(len(src)):
            s = src[k]
            if is_bad(s):
                skipped.append(s)
                continue
            yield s

    n = write_arrayrecord(path, good())
    if skipped:
        log.warning("convert_to_arrayrecord: skipped %d bad records of %r (first: %s: record %d: %s)",
                    len(skipped), source, skipped[0]["source"], skipped[0]["index"], skipped[0]["reason"])
    return n
