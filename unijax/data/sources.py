"""Random-access sources of *raw samples* read from real data on disk.

Every source implements grain's random-access protocol (``__len__`` and
``__getitem__(index)``; see ``grain.sources.RandomAccessDataSource``), is
picklable (grain worker processes receive a pickled copy) and opens files
lazily in each process. ``__getitem__`` returns one *raw sample*: a plain dict
with a decoded image and untokenised text. Tokenisation, resizing and packing
are the pipeline's job.

Raw sample contract
-------------------
Understanding (MMU); the image belongs to the first user turn (``"image": None`` for a
text-only conversation)::

    {"task": "mmu",
     "image": np.ndarray uint8 [H, W, 3] RGB at the file's native size,
     "turns": [["What is in the image?", "A red square."],
               ["And its colour?", "Red."]],
     "source": "data/llava.json",   # file the record came from
     "index": 17}                   # record index inside that file

Text-to-image (T2I)::

    {"task": "t2i",
     "image": np.ndarray uint8 [H, W, 3] RGB,
     "caption": "a red square on a white background",
     "source": "data/captions.jsonl",
     "index": 3}

Images are decoded with PIL and converted to RGB uint8 (grayscale, RGBA,
palette and 16-bit images are converted; alpha is dropped).

On-disk formats
---------------
``LlavaSource(json_path, image_root)``: a LLaVA conversation file, a JSON list of records
(``.json``, parsed once) or one record per line (``.jsonl``, read line by line), records like::

    {"id": "000000033471",
     "image": "coco/train2017/000000033471.jpg",      # relative to image_root
     "conversations": [
        {"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
        {"from": "gpt",   "value": "The bus is white and red."},
        {"from": "human", "value": "What feature can be seen on the back?"},
        {"from": "gpt",   "value": "An advertisement."}]}

Turns must alternate human/gpt starting with human and end with gpt ("user"
and "assistant" are accepted as aliases). Like LLaVA's own preprocessing, the
``<image>`` marker is removed from the user text and the text is stripped of
surrounding whitespace (so ``"<image>\\nWhat ...?"`` becomes ``"What ...?"``).
A record without "image" is a text-only conversation (its sample's ``"image"`` is
None). More than one ``<image>`` marker is a bad record: one image per conversation.

``CaptionSource(jsonl_path, image_root)``: JSON Lines, one object per line
(blank lines are ignored)::

    {"image": "imgs/00001.png", "caption": "a red square on a white background"}

``ParquetCaptionSource(parquet_path, image_root)``: a parquet file with a ``caption`` column
and an ``image`` column holding encoded image bytes, a path relative to ``image_root``, or the
Hugging Face ``datasets`` struct ``{"bytes": ..., "path": ...}``. Row groups are read on demand.

``open_source(path, image_root, task)`` picks the reader from the file's suffix.

``ArrayRecordSource(paths)`` (in ``unijax.data.arrayrecord``): one or more ArrayRecord files whose records are
msgpack-encoded dicts, the image as encoded PNG/JPEG bytes::

    {"task": "mmu", "image": b"\\x89PNG...", "turns": [["What is it?", "A square."]]}
    {"task": "t2i", "image": b"\\xff\\xd8...", "caption": "a red square"}

Write such files with :func:`write_arrayrecord` (from raw samples) or
:func:`convert_to_arrayrecord` (from any source, e.g. to turn a LLaVA JSON plus
image folder into one self-contained file). For an ArrayRecord source a
sample's ``source`` is the ArrayRecord file and ``index`` the record's position
inside that file.

Errors
------
A problem with one record (missing image file, undecodable image, bad JSON
line, malformed conversation, unknown task) raises :class:`BadRecordError`
(a ``ValueError``) whose message names the file, the record index and the
reason. Wrap a source with :func:`unijax.data.records.skip_bad` to turn those errors into
*bad-record markers* (test with :func:`is_bad`) that the pipeline drops and
counts. Problems with a whole file (missing, not a JSON list) raise
``FileNotFoundError`` / ``ValueError`` at construction.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

import numpy as np

from unijax.contract import IMAGE_MARKER
from unijax.data.records import (
    DEFAULT_LIMITS,
    MAX_IMAGES_PER_RECORD,
    MAX_RECORD_BYTES,
    BadRecordError,
    ImageLimits,
    decode_image_bytes,
    load_image_file,
    normalise_index,
)

log = logging.getLogger(__name__)

_USER_ROLES = ("human", "user")
_ASSISTANT_ROLES = ("gpt", "assistant")


# ----------------------------------------------------------------------------
# LLaVA conversation JSON
# ----------------------------------------------------------------------------


def _strip_marker(text: str) -> str:
    # As LLaVA's preprocess_multimodal: drop the marker, strip the whitespace.
    return text.replace(IMAGE_MARKER, "").strip() if IMAGE_MARKER in text else text


def llava_turns(conversations: Any, images: int = 1) -> list[list[str]]:
    """Converts a LLaVA ``conversations`` list to ``[[user, assistant], ...]``.

    With at most one image the ``<image>`` marker is removed (the image goes first, as LLaVA
    and Janus place it); with ``images > 1`` the markers stay where they are, one per image.
    Raises ``ValueError`` (with the reason) if the list does not alternate human/gpt starting
    with human and ending with gpt, or the markers do not match the images.
    """
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"'conversations' must be a non-empty list, got {type(conversations).__name__}")
    if len(conversations) % 2:
        raise ValueError(
            f"'conversations' has {len(conversations)} messages; expected human/gpt pairs (an even number)"
        )
    turns: list[list[str]] = []
    markers = 0
    for k in range(0, len(conversations), 2):
        pair = []
        for j, roles, want in ((k, _USER_ROLES, "human"), (k + 1, _ASSISTANT_ROLES, "gpt")):
            msg = conversations[j]
            if not isinstance(msg, dict) or "from" not in msg or "value" not in msg:
                raise ValueError(f"message {j} must be an object with 'from' and 'value', got {msg!r:.80}")
            if msg["from"] not in roles:
                raise ValueError(
                    f"message {j} is from {msg['from']!r} but conversations must alternate human/gpt "
                    f"starting with human (expected {want!r})"
                )
            if not isinstance(msg["value"], str):
                raise ValueError(f"message {j} 'value' must be a string, got {type(msg['value']).__name__}")
            pair.append(msg["value"])
        markers += pair[0].count(IMAGE_MARKER)
        turns.append([_strip_marker(pair[0]) if images <= 1 else pair[0].strip(), pair[1]])
    if images > 1 and markers != images:
        raise ValueError(f"{images} images but {markers} '{IMAGE_MARKER}' markers; put one marker where each image goes")
    if images <= 1 and markers > 1:
        raise ValueError(f"{markers} '{IMAGE_MARKER}' markers but {images} image")
    return turns


def _check_files(data_path, image_root, what: str) -> tuple[str, str]:
    """-> (data_path, image_root) as strings, after checking the file and the folder exist."""
    data_path = os.fspath(data_path)
    image_root = os.fspath(image_root) if image_root else os.path.dirname(os.path.abspath(data_path))
    if not os.path.isfile(data_path):
        raise FileNotFoundError(f"{what} {data_path!r} not found")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image_root {image_root!r} (for {data_path}) is not a directory")
    return data_path, image_root


class LlavaSource:
    """MMU raw samples from a LLaVA-style conversation file (`.json` list or `.jsonl` lines).

    Args:
      json_path: the file (see the module docstring).
      image_root: the folder the records' "image" paths are relative to.

    A `.json` list is parsed once at construction and kept as one compact buffer of per-record
    JSON strings (about the file's size, cheap to pickle to grain workers); a `.jsonl` file is
    indexed by line offsets and read one line per record. Each ``__getitem__`` parses one record
    and reads its image.
    """

    task = "mmu"

    def __init__(self, json_path: str | os.PathLike, image_root: str | os.PathLike, keep_bytes: bool = False,
                 limits: ImageLimits = DEFAULT_LIMITS):
        self.json_path, self.image_root = _check_files(json_path, image_root, "LLaVA JSON file")
        self.keep_bytes = keep_bytes  # samples hold the images' original encoded bytes (`unijax.pack`)
        self.limits = limits
        self._lines = JsonLines(self.json_path, "mmu") if self.json_path.endswith(".jsonl") else None
        if self._lines is not None:
            return
        try:
            with open(self.json_path, "rb") as f:
                records = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.json_path}: not valid JSON ({e}); expected a list of LLaVA records "
                             f"(name the file .jsonl for one record per line)") from None
        except RecursionError:
            raise ValueError(f"{self.json_path}: JSON nested too deeply to parse; as .jsonl (one record per line) "
                             f"such a record would be skipped and counted") from None
        if not isinstance(records, list):
            raise ValueError(
                f"{self.json_path}: top level is a JSON {type(records).__name__}, expected a list of LLaVA records"
            )
        blobs = [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in records]
        del records
        self._offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in blobs], out=self._offsets[1:])
        self._buf = b"".join(blobs)

    def __len__(self) -> int:
        return len(self._lines) if self._lines is not None else len(self._offsets) - 1

    def __repr__(self) -> str:
        return f"LlavaSource(json_path={self.json_path!r}, image_root={self.image_root!r}, len={len(self)})"

    def record(self, index: int) -> Any:
        """The raw JSON record at ``index`` (parsed, not validated)."""
        if self._lines is not None:
            return self._lines.record(index)
        i = normalise_index(index, len(self), self.json_path)
        if self._offsets[i + 1] - self._offsets[i] > MAX_RECORD_BYTES:
            raise BadRecordError(self.json_path, i, f"record is {int(self._offsets[i + 1] - self._offsets[i]):,} "
                                 f"bytes, more than {MAX_RECORD_BYTES:,}; split it or shorten it", "mmu")
        return parse_record(self._buf[self._offsets[i] : self._offsets[i + 1]], self.json_path, i, "mmu")

    def __getitem__(self, index: int) -> dict:
        i = normalise_index(index, len(self), self.json_path)
        rec = self.record(i)
        name = self.json_path
        if not isinstance(rec, dict):
            raise BadRecordError(name, i, f"record is a JSON {type(rec).__name__}, expected an object", "mmu")
        paths = rec.get("image")
        many = isinstance(paths, list)
        try:
            turns = llava_turns(rec.get("conversations"), len(paths) if many else int(paths is not None))
        except ValueError as e:
            raise BadRecordError(name, i, f"malformed conversation: {e}", "mmu") from None
        if many and len(paths) > MAX_IMAGES_PER_RECORD:
            raise BadRecordError(name, i, f"{len(paths)} images, more than {MAX_IMAGES_PER_RECORD} a record may name", "mmu")
        if many and len(paths) > 1:  # a multi-image conversation: the images in the order of their marks
            images = [load_image_file(self.image_root, p, name, i, "mmu", self.keep_bytes, self.limits) for p in paths]
            return {"task": "mmu", "images": images, "turns": turns, "source": name, "index": i}
        if many:
            rec["image"] = paths[0] if paths else None
        if rec.get("image") is None:
            if any(IMAGE_MARKER in str(m.get("value", "")) for m in rec["conversations"] if isinstance(m, dict)):
                raise BadRecordError(name, i, f"a '{IMAGE_MARKER}' mark but no 'image' path", "mmu")
            return {"task": "mmu", "image": None, "turns": turns, "source": name, "index": i}
        image = load_image_file(self.image_root, rec["image"], name, i, "mmu", self.keep_bytes, self.limits)
        return {"task": "mmu", "image": image, "turns": turns, "source": name, "index": i}


# ----------------------------------------------------------------------------
# caption JSONL
# ----------------------------------------------------------------------------


def _line_offsets(path: str) -> np.ndarray:
    """Byte offsets [start, end) of every non-blank line, as an int64 [N, 2] array."""
    starts, ends = [], []
    pos = 0
    with open(path, "rb") as f:
        for line in f:
            n = len(line)
            if line.strip():
                starts.append(pos)
                ends.append(pos + n)
            pos += n
    return np.stack([np.asarray(starts, np.int64), np.asarray(ends, np.int64)], axis=1) if starts else np.zeros(
        (0, 2), np.int64
    )


class JsonLines:
    """Random access to the non-blank lines of a JSON Lines file, one parsed object per line.

    Line byte offsets are indexed at construction; each read is one ``os.pread`` (thread-safe)
    from a file descriptor opened lazily in each process (picklable for grain workers).
    """

    def __init__(self, path: str, task: str):
        self.path, self.task = path, task
        self._offsets = _line_offsets(path)
        self._fd: int | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fd"] = None
        state["_pid"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None and getattr(self, "_pid", None) == os.getpid():
            try:
                os.close(fd)
            except OSError:
                pass

    def __len__(self) -> int:
        return len(self._offsets)

    def _file(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:  # first use in this process (or after a fork)
            with self._lock:
                if self._fd is None or self._pid != pid:
                    self._fd = os.open(self.path, os.O_RDONLY)
                    self._pid = pid
        return self._fd

    def line(self, index: int) -> bytes:
        """The raw bytes of record ``index``'s line."""
        i = normalise_index(index, len(self), self.path)
        start, end = (int(x) for x in self._offsets[i])
        if end - start > MAX_RECORD_BYTES:
            raise BadRecordError(self.path, i, f"record is {end - start:,} bytes, more than {MAX_RECORD_BYTES:,}; "
                                 f"split it or shorten it", self.task)
        data = os.pread(self._file(), end - start, start)
        if len(data) != end - start:
            raise BadRecordError(
                self.path, i, "file is shorter than when it was indexed (it changed on disk; rebuild the source)",
                self.task,
            )
        return data

    def record(self, index: int) -> Any:
        """Line ``index`` parsed as JSON (a :class:`BadRecordError` when it is not JSON)."""
        i = normalise_index(index, len(self), self.path)
        return parse_record(self.line(i), self.path, i, self.task)


def parse_record(data: bytes, path: str, i: int, task: str | None) -> Any:
    """One record's JSON (a :class:`BadRecordError` when it is not JSON or nests too deeply to parse)."""
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRecordError(path, i, f"line is not valid JSON ({e}); fix or delete that line", task) from None
    except RecursionError:
        raise BadRecordError(path, i, "JSON nested too deeply to parse; fix or delete that line", task) from None


def _caption_sample(rec: Any, name: str, i: int, image_of) -> dict:
    if not isinstance(rec, dict):
        raise BadRecordError(name, i, f"record is a {type(rec).__name__}, expected an object", "t2i")
    caption = rec.get("caption")
    if not isinstance(caption, str):
        raise BadRecordError(name, i, f"'caption' must be a string, got {caption!r:.80}", "t2i")
    if len(caption) > MAX_RECORD_BYTES:
        raise BadRecordError(name, i, f"caption of {len(caption):,} characters, more than {MAX_RECORD_BYTES:,}", "t2i")
    if rec.get("image") is None:
        raise BadRecordError(name, i, "record has no 'image'", "t2i")
    return {"task": "t2i", "image": image_of(rec["image"]), "caption": caption, "source": name, "index": i}


class CaptionSource:
    """T2I raw samples from a JSON Lines caption file.

    Args:
      jsonl_path: one ``{"image": "rel/path.png", "caption": "..."}`` per line
        (blank lines are skipped and not counted as records).
      image_root: the folder the "image" paths are relative to.
    """

    task = "t2i"

    def __init__(self, jsonl_path: str | os.PathLike, image_root: str | os.PathLike, keep_bytes: bool = False,
                 limits: ImageLimits = DEFAULT_LIMITS):
        self.jsonl_path, self.image_root = _check_files(jsonl_path, image_root, "caption JSONL file")
        self.keep_bytes = keep_bytes
        self.limits = limits
        self._lines = JsonLines(self.jsonl_path, "t2i")

    def __len__(self) -> int:
        return len(self._lines)

    def __repr__(self) -> str:
        return f"CaptionSource(jsonl_path={self.jsonl_path!r}, image_root={self.image_root!r}, len={len(self)})"

    def line(self, index: int) -> bytes:
        """The raw bytes of record ``index``'s line."""
        return self._lines.line(index)

    def __getitem__(self, index: int) -> dict:
        i = normalise_index(index, len(self), self.jsonl_path)
        rec = self._lines.record(i)
        return _caption_sample(rec, self.jsonl_path, i,
                               lambda image: load_image_file(self.image_root, image, self.jsonl_path, i, "t2i",
                                                              self.keep_bytes, self.limits))


class ParquetCaptionSource:
    """T2I raw samples from a parquet file: a ``caption`` column and an ``image`` column (encoded
    bytes, a path under ``image_root``, or ``{"bytes", "path"}`` as Hugging Face datasets write).

    Row-group boundaries are read at construction; a record reads its row group's two columns
    (the last group read is cached per process), so the file is never loaded whole.
    """

    task = "t2i"

    def __init__(self, parquet_path: str | os.PathLike, image_root: str | os.PathLike = "", keep_bytes: bool = False,
                 limits: ImageLimits = DEFAULT_LIMITS):
        import pyarrow.parquet as pq  # deferred: only parquet users need it

        self.keep_bytes = keep_bytes
        self.limits = limits
        self.parquet_path = os.fspath(parquet_path)
        self.image_root = os.fspath(image_root) if image_root else os.path.dirname(self.parquet_path)
        if not os.path.isfile(self.parquet_path):
            raise FileNotFoundError(f"caption parquet file {self.parquet_path!r} not found")
        try:
            meta = pq.ParquetFile(self.parquet_path).metadata
        except Exception as e:
            raise ValueError(f"{self.parquet_path}: not a parquet file ({e})") from None
        names = set(meta.schema.names) | {meta.schema.column(i).path.split(".")[0] for i in range(meta.num_columns)}
        missing = [c for c in ("image", "caption") if c not in names]
        if missing:
            raise ValueError(f"{self.parquet_path}: no column {missing[0]!r} (columns: {sorted(names)}); "
                             f"expected 'image' and 'caption'")
        rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self._cache: tuple[int, Any] | None = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __repr__(self) -> str:
        return f"ParquetCaptionSource(parquet_path={self.parquet_path!r}, len={len(self)})"

    def _group(self, g: int):
        if self._cache is None or self._cache[0] != g:
            import pyarrow.parquet as pq

            table = pq.ParquetFile(self.parquet_path).read_row_group(g, columns=["image", "caption"])
            self._cache = (g, table.to_pydict())
        return self._cache[1]

    def _image(self, value: Any, i: int) -> np.ndarray:
        name = self.parquet_path
        if isinstance(value, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return decode_image_bytes(value, name, i, "t2i", self.keep_bytes, self.limits)
        return load_image_file(self.image_root, value, name, i, "t2i", self.keep_bytes, self.limits)

    def __getitem__(self, index: int) -> dict:
        i = normalise_index(index, len(self), self.parquet_path)
        g = int(np.searchsorted(self._starts, i, side="right") - 1)
        cols = self._group(g)
        j = i - int(self._starts[g])
        rec = {"image": cols["image"][j], "caption": cols["caption"][j]}
        return _caption_sample(rec, self.parquet_path, i, lambda image: self._image(image, i))


def open_source(path: str, image_root: str, task: str, keep_bytes: bool = False, limits: ImageLimits = DEFAULT_LIMITS):
    """The source reading `path` for `task` ("mmu": `.json` / `.jsonl` conversations; "t2i": `.jsonl`
    or `.parquet` captions), chosen by the file's suffix; `keep_bytes`: samples hold the images'
    original encoded bytes instead of pixels; `limits`: what one image may be (`records.ImageLimits`)."""
    path = os.fspath(path)
    if task == "mmu":
        if not path.endswith((".json", ".jsonl")):
            raise ValueError(f"{path}: conversation files are .json (a list) or .jsonl (one record per line)")
        return LlavaSource(path, image_root, keep_bytes, limits)
    if path.endswith(".parquet"):
        return ParquetCaptionSource(path, image_root, keep_bytes, limits)
    if path.endswith(".jsonl"):
        return CaptionSource(path, image_root, keep_bytes, limits)
    raise ValueError(f"{path}: caption files are .jsonl or .parquet")
