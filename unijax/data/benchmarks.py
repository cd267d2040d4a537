"""Benchmark items: the shapes world's held-out suites and loaders for the real files users bring.

Every loader returns a list of plain dict items with a unique string `id` (what `unijax.evaluate`
resumes by). Understanding items hold an `image` (uint8 `[H, W, 3]` array, or a path read lazily by
`load_item_image`) and a `question`; generation items hold a `prompt` and its GenEval `metadata`.

Real-file formats:
- POPE (`pope_items`): the question files of the POPE repository (`coco_pope_random.json`, ...), one
  JSON object per line: `{"question_id": 1, "image": "COCO_val2014_000000016631.jpg",
  "text": "Is there a person in the image?", "label": "yes"}`; images under `image_root`. The split
  is the file name's last `_` word (`random`, `popular`, `adversarial`).
- MMMU (`mc_items`): MMMU's records in `.parquet` (its layout: one folder per subject holding
  `<split>-00000-of-00001.parquet`; pass the folder of subjects, a subject's folder or files),
  `.json` (a list) or `.jsonl`: `id`, `question`, `options` (a list, or its Python-literal string
  as MMMU stores it; empty for open questions), `answer` (a letter; for open questions the answer
  text or a list of accepted answers), `question_type` (`multiple-choice` / `open`), the images as
  `image_1` ... `image_7` (a path under `image_root`, or parquet's `{"bytes": ...}`; `image` for
  one); optional `subfield` / `category`. Each `<image k>` mark of the question or options becomes
  an image at that place, in order of appearance; a question with one image gets it first (and
  the mark removed), as the Janus chat places it. Prompts end with MMMU's instructions
  (`MC_INSTRUCTION`, `OPEN_INSTRUCTION`).
- GenEval (`geneval_items`): GenEval's `evaluation_metadata.jsonl`, one prompt's metadata per line
  (`{"tag": "two_object", "include": [{"class": "bench", "count": 1}, ...], "prompt": "..."}`).
"""

from __future__ import annotations

import ast
import json
import pathlib
import re
from typing import Any

import numpy as np

from unijax.contract import IMAGE_MARKER
from unijax.data import records, shapes
from unijax.data.sources import open_source

LETTERS_UPPER = "ABCDEFGHIJ"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."  # MMMU's prompts
OPEN_INSTRUCTION = "Answer the question using a single word or phrase."  # MMMU's open / LLaVA's POPE prompt
_IMAGE_MARK = re.compile(r"<image (\d+)>")


class BenchmarkFileError(ValueError):
    """A benchmark file or record that cannot be read; the message names the file and record."""


# -- shapes suites ----------------------------------------------------------------------------------
def shapes_pope_items(seed: int, num_images: int, size: int = 32) -> list[dict]:
    """POPE on held-out shapes scenes: per image one positive question and one negative of each split
    (random / popular / adversarial) the scene admits. A split is the positives plus its negatives, as
    in POPE, so each split is balanced yes / no."""
    items = []
    for i in range(num_images):
        scene = shapes.scene_at(seed, i, size)
        rng = np.random.default_rng([seed, i, 7])
        for kind in ("exist_positive", *shapes.EXIST_NEGATIVE_KINDS):
            try:
                qa = shapes.make_question(scene, kind, rng)
            except ValueError:  # the scene has no negative of this kind
                continue
            items.append({"id": f"{i}/{kind}", "seed": seed, "size": size, "scene": i, "question": qa.question, "answer": qa.answer,
                          "splits": list(shapes.EXIST_NEGATIVE_KINDS) if kind == "exist_positive" else [kind]})
    return items


def shapes_mc_items(seed: int, num_questions: int, size: int = 32) -> list[dict]:
    """Lettered multiple-choice questions (the shapes `choice` kind) on held-out scenes; `category`
    is what the options range over (colour or count)."""
    items = []
    for i in range(num_questions):
        scene = shapes.scene_at(seed, i, size)
        qa = shapes.make_question(scene, "choice", np.random.default_rng([seed, i, 11]))
        options = [line.split(". ", 1)[1] for line in qa.question.split("\n")[1:-1]]
        items.append({"id": str(i), "seed": seed, "size": size, "scene": i, "question": qa.question,
                      "answer": qa.answer.upper(), "options": options,
                      "category": "count" if qa.question.startswith("how many") else "colour"})
    return items


def spec_to_metadata(text: str, spec: shapes.PromptSpec) -> dict:
    """A shapes `PromptSpec` in GenEval's metadata format (`color`, and `position: [relation, j]` on the
    include entry that stands in `relation` to include[j])."""
    include = []
    for k, (shape, colour, count) in enumerate(spec.include):
        entry: dict[str, Any] = {"class": shape, "count": count}
        if colour is not None:
            entry["color"] = colour
        if spec.position is not None and spec.position[1] == k:
            entry["position"] = [spec.position[0], spec.position[2]]
        include.append(entry)
    out = {"tag": spec.tag, "include": include, "prompt": text}
    if spec.exclude:
        out["exclude"] = [{"class": s, "count": n, **({"color": c} if c else {})} for s, c, n in spec.exclude]
    return out


def metadata_to_spec(meta: dict, where: str) -> shapes.PromptSpec | None:
    """GenEval metadata -> a shapes `PromptSpec`, or None when it names classes or colours the shapes
    detector does not know (COCO objects): such prompts can only be scored by GenEval's own scorer."""
    try:
        include, position = [], None
        for k, e in enumerate(meta["include"]):
            include.append((e["class"], e.get("color"), int(e.get("count", 1))))
            if "position" in e:
                position = (e["position"][0], k, int(e["position"][1]))
        exclude = [(e["class"], e.get("color"), int(e.get("count", 1))) for e in meta.get("exclude", [])]
        tag = meta["tag"]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise BenchmarkFileError(f"{where}: not GenEval metadata ({type(e).__name__}: {e})") from e
    known = all(s in shapes.SHAPES and (c is None or c in shapes.COLOURS) for s, c, _ in include + exclude)
    if not known or (position and position[0] not in shapes.RELATIONS):
        return None
    return shapes.PromptSpec(tag, tuple(include), tuple(exclude), position)


def shapes_geneval_items(seed: int, per_tag: int, size: int = 32) -> list[dict]:
    """GenEval-style prompts on the shapes world (`shapes.prompt_set`: `per_tag` of each tag)."""
    return [{"id": f"{k:05d}", "prompt": text, "metadata": spec_to_metadata(text, spec)}
            for k, (text, spec, _) in enumerate(shapes.prompt_set(seed, per_tag, size))]


# -- real files ---------------------------------------------------------------------------------------
def _read_records(path: pathlib.Path) -> list[dict]:
    if not path.is_file():
        raise BenchmarkFileError(f"{path}: no such file")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover - pyarrow is in requirements.txt
            raise BenchmarkFileError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises its own error types
            raise BenchmarkFileError(f"{path}: not a readable parquet file ({e})") from e
    text = path.read_text()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise BenchmarkFileError(f"{path}: invalid JSON ({e})") from e
    else:  # JSON lines (POPE's .json files are JSON lines too)
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BenchmarkFileError(f"{path}: line {n} is not JSON ({e})") from e
    if not all(isinstance(r, dict) for r in records):
        raise BenchmarkFileError(f"{path}: expected JSON objects, one per record")
    return records


def pope_items(files: list[str], image_root: str, instruction: str = OPEN_INSTRUCTION) -> list[dict]:
    """POPE's question files; `instruction` is appended to each question on a new line (LLaVA's and
    Janus's POPE evaluation ask for a single word; "" asks the bare question)."""
    items = []
    for f in files:
        path = pathlib.Path(f)
        split = path.stem.split("_")[-1]
        records = _read_records(path)
        if not records:
            raise BenchmarkFileError(f"{path}: no POPE records")
        for n, r in enumerate(records):
            try:
                if "category" in r and "answer" in r:  # lmms-lab/POPE's parquet: the image inside, the split a column
                    label, text, where = str(r["answer"]), str(r["question"]), str(r["category"])
                    image = r["image"]["bytes"] if isinstance(r["image"], dict) else r["image"]
                    origin = {"source": f"{path}: record {n}"}
                else:  # the POPE repository's files: one split per file, images under image_root
                    label, text, where = str(r["label"]), str(r["text"]), split
                    image = str(pathlib.Path(image_root) / r["image"])
                    origin = {}
                label = label.strip().lower()
                item = {"id": f"{where}/{r['question_id']}", "image": image,
                        "question": text + (f"\n{instruction}" if instruction else ""), "answer": label,
                        "splits": [where], **origin}
            except (KeyError, TypeError) as e:
                raise BenchmarkFileError(f"{path}: record {n} has no {e} (POPE records need question_id, image, "
                                         f"text, label; or lmms-lab's question_id, image, question, answer, "
                                         f"category)") from None
            if label not in ("yes", "no"):
                raise BenchmarkFileError(f"{path}: record {n}: label {label!r} is not yes / no")
            items.append(item)
    return items


def files_task(path: pathlib.Path) -> str:
    """"mmu" for conversations (`.json`, or `.jsonl` whose first record has `conversations`), "t2i"
    for captions (`.parquet`, or `.jsonl` whose first record has `caption`)."""
    if path.suffix == ".json":
        return "mmu"
    if path.suffix == ".parquet":
        return "t2i"
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            first = next((line for line in f if line.strip()), b"")
        try:
            rec = json.loads(first) if first else {}
        except (json.JSONDecodeError, RecursionError):
            rec = {}
        if isinstance(rec, dict) and "conversations" in rec:
            return "mmu"
        if isinstance(rec, dict) and "caption" in rec:
            return "t2i"
        raise BenchmarkFileError(f"{path}: its first record has neither 'conversations' (understanding) nor "
                                 f"'caption' (generation)")
    raise BenchmarkFileError(f"{path}: held-out files are .json / .jsonl conversations or .jsonl / .parquet captions")


_FILE_SOURCES: dict[tuple[str, str, str], Any] = {}


def _file_source(path: str, task: str, image_root: str):
    key = (path, task, image_root)
    if key not in _FILE_SOURCES:
        _FILE_SOURCES[key] = open_source(path, image_root or str(pathlib.Path(path).parent), task)
    return _FILE_SOURCES[key]


def files_items(files: list[str], image_root: str = "") -> tuple[list[dict], list[dict]]:
    """Your held-out data as evaluation items: (items, skipped). An understanding record is one item
    (its first turn: the question and the reference answer, with its image or images); a caption
    record is one item (the caption and its image). Bad records and text-only conversations are
    skipped, each with its reason. Images are read when predicted (`file_record`)."""
    items, skipped = [], []
    for f in files:
        path = pathlib.Path(f)
        if not path.is_file():
            raise BenchmarkFileError(f"{path}: no such file")
        task = files_task(path)
        src = _file_source(str(path), task, image_root)
        if len(src) == 0:
            raise BenchmarkFileError(f"{path}: no records")
        for i in range(len(src)):
            try:
                rec = src[i]
            except records.BadRecordError as e:
                skipped.append({"source": str(path), "index": i, "reason": e.reason})
                continue
            base = {"id": f"{path.name}/{i}", "task": task, "file": str(path), "index": i, "image_root": image_root}
            if task == "t2i":
                items.append({**base, "caption": rec["caption"]})
            elif rec.get("image") is None and not rec.get("images"):
                skipped.append({"source": str(path), "index": i, "reason": "a text-only conversation (no image)"})
            else:
                question, answer = rec["turns"][0]
                items.append({**base, "question": question, "answer": answer})
    return items, skipped


def file_record(item: dict) -> dict:
    """The raw sample (`unijax.data.sources`) behind a `files_items` item, its image(s) decoded."""
    return _file_source(item["file"], item["task"], item["image_root"])[item["index"]]


def _options(value, where: str) -> list[str]:
    """The options list (empty for an open question)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as e:
            raise BenchmarkFileError(f"{where}: options {value[:60]!r} is not a list") from e
    if not isinstance(value, (list, tuple)) or len(value) == 1 or len(value) > len(LETTERS_UPPER):
        raise BenchmarkFileError(f"{where}: options must be a list of 2-{len(LETTERS_UPPER)} strings "
                                 f"(or empty: an open question)")
    return [str(v) for v in value]


def _open_answer(value) -> str | list[str]:
    """An open question's gold answer: a string, or the accepted answers (MMMU stores a list as its
    Python-literal string)."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = ast.literal_eval(text)
            if isinstance(parsed, (list, tuple)):
                return [str(v) for v in parsed]
        except (ValueError, SyntaxError):
            pass
    return text


def _item_images(r: dict, prompt: str, where: str) -> tuple[str, Any]:
    """(prompt with `<image k>` marks placed, the image or the images in mark order)."""
    def image(k: int):
        value = r.get(f"image_{k}", r.get("image") if k == 1 else None)
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if value is None:
            raise BenchmarkFileError(f"{where}: the question refers to <image {k}> but image_{k} is empty")
        return value

    order = [int(k) for k in _IMAGE_MARK.findall(prompt)]
    if len(order) <= 1:
        return _IMAGE_MARK.sub("", prompt).strip(), image(order[0] if order else 1)
    return _IMAGE_MARK.sub(IMAGE_MARKER, prompt), [image(k) for k in order]


def mc_prompt(question: str, options: list[str]) -> str:
    """MMMU's multiple-choice prompt: the question, `A. option` lines, then the instruction; an open
    question (no options) ends with the single-word-or-phrase instruction."""
    if not options:
        return f"{question.strip()}\n{OPEN_INSTRUCTION}"
    lines = [question.strip()] + [f"{LETTERS_UPPER[i]}. {o}" for i, o in enumerate(options)]
    return "\n".join(lines + [MC_INSTRUCTION])


def mmmu_files(paths: list[str], split: str = "validation") -> list[pathlib.Path]:
    """Files of `paths`: a file is itself; a folder gives its `<split>-*.parquet` files at any depth
    (MMMU's per-subject layout), sorted."""
    out = []
    for p in map(pathlib.Path, paths):
        if p.is_dir():
            found = sorted(p.rglob(f"{split}-*.parquet"))
            if not found:
                raise BenchmarkFileError(f"{p}: no {split}-*.parquet file below this folder (MMMU's layout: "
                                         f"<subject>/{split}-00000-of-00001.parquet)")
            out += found
        else:
            out.append(p)
    return out


def mc_items(files: str | list[str], image_root: str = "", split: str = "validation") -> list[dict]:
    """MMMU items (multiple-choice and open) from files or folders (`mmmu_files`)."""
    items = []
    for path in mmmu_files([files] if isinstance(files, str) else list(files), split):
        for n, r in enumerate(_read_records(path)):
            where = f"{path}: record {n}"
            try:
                options = _options(r["options"] if "options" in r else None, where)
                question, raw_answer = str(r["question"]), r["answer"]
            except KeyError as e:
                raise BenchmarkFileError(f"{where} has no {e} (MMMU records need question, options, answer)") from None
            kind = str(r.get("question_type") or ("multiple-choice" if options else "open"))
            if kind == "multiple-choice":
                answer = str(raw_answer).strip().upper()
                if answer not in LETTERS_UPPER[:len(options)]:
                    raise BenchmarkFileError(f"{where}: answer {answer!r} is not one of the option letters")
            elif kind == "open":
                answer = _open_answer(raw_answer)
            else:
                raise BenchmarkFileError(f"{where}: question_type {kind!r} is not multiple-choice / open")
            prompt, image = _item_images(r, mc_prompt(question, options), where)
            image = [str(pathlib.Path(image_root) / i) if isinstance(i, str) else i for i in image] \
                if isinstance(image, list) else (str(pathlib.Path(image_root) / image) if isinstance(image, str) else image)
            items.append({"id": str(r.get("id", f"{path.parent.name}/{n}")), "image": image, "question": prompt,
                          "answer": answer, "options": options, "question_type": kind,
                          "category": str(r.get("subfield") or r.get("category") or "all"), "source": where})
    ids = [it["id"] for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise BenchmarkFileError(f"MMMU items: id {dup!r} appears twice (two files of the same subject and split?)")
    return items


def geneval_items(file: str) -> list[dict]:
    """GenEval's `evaluation_metadata.jsonl`: item k is line k, written to `<out>/<k:05d>/`."""
    path = pathlib.Path(file)
    items = []
    for n, meta in enumerate(_read_records(path)):
        if "prompt" not in meta:
            raise BenchmarkFileError(f"{path}: line {n + 1} has no prompt")
        metadata_to_spec(meta, f"{path}: line {n + 1}")  # validates the structure
        items.append({"id": f"{n:05d}", "prompt": str(meta["prompt"]), "metadata": meta})
    return items


def load_item_image(item: dict):
    """The item's image as uint8 `[H, W, 3]`: a shapes scene (`seed`, `scene`, `size`), an array,
    encoded bytes or a path (named on failure); a list of them for a multi-image item."""
    if "scene" in item:
        return shapes.render(shapes.scene_at(item["seed"], item["scene"], item["size"]))
    image = item["image"]
    if isinstance(image, list):
        return [load_item_image({**item, "image": im}) for im in image]
    if isinstance(image, np.ndarray):
        return image
    try:
        data = image if isinstance(image, bytes) else records.read_image_bytes(str(image))
        return records.decode_image(data)  # pixels checked from the header before decoding
    except Exception as e:  # PIL raises many types for bad data (a decompression bomb included)
        where = item.get("source", image if isinstance(image, str) else f"item {item['id']}")
        raise BenchmarkFileError(f"{where}: image not readable ({type(e).__name__}: {e})") from None
