"""Evaluation suites: items (`unijax.data.benchmarks`), predictions through an `Engine`, metrics.

Three kinds, each computed the way its benchmark reports it:
- `pope` (yes/no): per split accuracy, precision, recall, F1 and yes-ratio with "yes" the positive
  class; the answer is "no" when its first sentence holds the word no / not (POPE's rule,
  `shapes.answer_is_yes`); `average` is the mean over splits.
- `mc` (MMMU: multiple choice and open questions): accuracy, overall and per category; the
  letter is extracted from the response MMMU-style (`extract_choice`); a response with no letter
  counts as wrong (MMMU draws a random letter instead) and is reported as `unparsed`; an open
  question is scored by MMMU's open-answer rules (`parse_open_response`, `open_correct`).
- `geneval` (generation): every sample is written in GenEval's folder layout
  (`<out>/images/<k:05d>/metadata.jsonl`, `samples/<j:04d>.png`, `grid.png`) and, when the prompt only
  names shapes and colours, scored by the shapes detector with GenEval's rule: accuracy per tag over
  samples; `overall` is the mean over tags (GenEval's overall score).

Suites: `shapes_pope`, `shapes_mc`, `shapes_geneval` (held-out shapes scenes: the seed offset the
training stream never uses) and `pope`, `mmmu`, `geneval` (files; see `unijax.data.benchmarks`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from unijax.data import benchmarks, datasets, shapes
from unijax.inference.images import save_grid
from unijax.inference.sampling import Sampling
from unijax.io import write_outputs

SUITES = ("shapes_pope", "shapes_mc", "shapes_geneval", "pope", "mmmu", "geneval", "files")
KIND = {"shapes_pope": "pope", "pope": "pope", "shapes_mc": "mc", "mmmu": "mc", "shapes_geneval": "geneval",
        "geneval": "geneval", "files": "files"}


@dataclasses.dataclass
class Options:
    """What a suite's items and predictions depend on (the resume fingerprint)."""

    seed: int = 0
    size: int = 32
    num_images: int = 100      # shapes_pope: images (4 questions each, up to)
    num_questions: int = 200   # shapes_mc
    per_tag: int = 10          # shapes_geneval: prompts per tag
    samples: int = 4           # geneval: images per prompt (GenEval: 4)
    cfg: float = 5.0
    temperature: float = 1.0   # generation; answers are greedy
    top_k: int = 0
    max_new_tokens: int = 16
    files: tuple[str, ...] = ()  # pope: question files; mmmu: files or folders; geneval: one file
    image_root: str = ""
    split: str = "validation"    # mmmu: the split read from a folder of subjects
    pope_instruction: str = benchmarks.OPEN_INSTRUCTION  # pope: appended to each question ("" for none)


class Items(list):
    """A suite's items, with the records its files held that could not become items (`skipped`)."""

    def __init__(self, items=(), skipped=()):
        super().__init__(items)
        self.skipped = list(skipped)


def build_items(suite: str, o: Options) -> list[dict]:
    if suite not in SUITES:
        raise ValueError(f"suite {suite!r} is not one of {', '.join(SUITES)}")
    seed = o.seed + datasets.HELD_OUT_SEED_OFFSET
    if suite == "shapes_pope":
        return benchmarks.shapes_pope_items(seed, o.num_images, o.size)
    if suite == "shapes_mc":
        return benchmarks.shapes_mc_items(seed, o.num_questions, o.size)
    if suite == "shapes_geneval":
        return benchmarks.shapes_geneval_items(seed, o.per_tag, o.size)
    if not o.files:
        raise ValueError(f"suite {suite!r} reads a benchmark file: pass --files")
    if suite == "pope":
        return benchmarks.pope_items(list(o.files), o.image_root, o.pope_instruction)
    if suite == "mmmu":
        return benchmarks.mc_items(list(o.files), o.image_root, o.split)
    if suite == "files":
        items, skipped = benchmarks.files_items(list(o.files), o.image_root)
        if not items:
            raise ValueError(f"suite files: no record of {', '.join(o.files)} can be evaluated "
                             f"({len(skipped)} skipped; first: {skipped[0]['reason'] if skipped else 'none'})")
        return Items(items, skipped=skipped)
    if len(o.files) != 1:
        raise ValueError(f"suite {suite!r} reads one file, got {len(o.files)}")
    return benchmarks.geneval_items(o.files[0])


# -- answer parsing and metrics ----------------------------------------------------------------------
def extract_choice(response: str, options: Sequence[str]) -> str | None:
    """MMMU's `parse_multi_choice_response` without its random fallback: "(B)", then a bare "B"
    between spaces, then (for responses over 5 words) an option's text; the last mention wins when
    several letters appear. A response that is one letter matches in either case."""
    letters = benchmarks.LETTERS_UPPER[:len(options)]
    r = response.strip()
    for ch in ",.!?;:'":
        r = r.strip(ch)
    if len(r) == 1 and r.upper() in letters:
        return r.upper()
    r = f" {r} "
    found = [c for c in letters if f"({c})" in r] or [c for c in letters if f" {c} " in r]
    by_content = False
    if not found and len(r.split()) > 5:
        found = [c for c, o in zip(letters, options) if o.lower() in r.lower()]
        by_content = True
    if not found:
        return None
    if len(found) == 1:
        return found[0]
    if by_content:
        return max(found, key=lambda c: r.lower().rfind(options[letters.index(c)].lower()))
    return max(found, key=lambda c: max(r.rfind(f"({c})"), r.rfind(f" {c} ")))


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def _normalise(text: str) -> list:
    """MMMU's `normalize_str`: a number becomes a float rounded to 2 decimals; other text is lower-cased,
    and a one-character answer gets a space on one side (no trivial substring matches)."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


_NUMBERS = (re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"), re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),
            re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"))
_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")


def parse_open_response(response: str) -> list:
    """MMMU's open-answer parsing: the tail after the last key phrase ("is ", "so ", "answer ", ...;
    also "=" in the last sentence) of each sentence, the numbers in them, normalised (`_normalise`)."""
    text = response.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", text)  # (lower-cased first, as MMMU does)
    keys = []
    for i, sentence in enumerate(sentences):
        indicators = _KEY_INDICATORS + (("=",) if i == len(sentences) - 1 else ())
        tails = [sentence.split(ind)[-1].strip() for ind in indicators if ind in sentence]
        if tails:
            shortest = min(tails, key=len)
            if shortest not in (":", ",", ".", "!", "?", ";", "'"):
                keys.append(shortest)
    keys = keys or [text]
    candidates = keys + [n for k in keys for pattern in _NUMBERS for n in pattern.findall(k)]
    out = []
    for c in candidates:
        for v in _normalise(c):
            if v not in out:
                out.append(v)
    return out


def open_correct(answer, predictions: list) -> bool:
    """MMMU's `eval_open`: a predicted number equals a gold one, or a gold text lies inside a predicted text."""
    gold = [v for a in (answer if isinstance(answer, list) else [answer]) for v in _normalise(str(a))]
    for p in predictions:
        if isinstance(p, str):
            if any(isinstance(g, str) and g in p for g in gold):
                return True
        elif p in gold:
            return True
    return False


def pope_scores(truth_yes: np.ndarray, pred_yes: np.ndarray) -> dict[str, float]:
    """POPE's metrics with "yes" as the positive class."""
    t, p = np.asarray(truth_yes, bool), np.asarray(pred_yes, bool)
    tp, fp, fn = int((t & p).sum()), int((~t & p).sum()), int((t & ~p).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": float((t == p).mean()), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": float(p.mean()), "n": int(len(t))}


def metrics(suite: str, items: list[dict], preds: dict[str, dict]) -> dict:
    kind = KIND[suite]
    if kind == "pope":
        splits = sorted({s for it in items for s in it["splits"]}, key=lambda s: (
            shapes.EXIST_NEGATIVE_KINDS.index(s) if s in shapes.EXIST_NEGATIVE_KINDS else 9, s))
        out = {}
        for s in splits:
            sel = [it for it in items if s in it["splits"]]
            out[s.removeprefix("exist_")] = pope_scores(np.array([it["answer"] == "yes" for it in sel]),
                                                        np.array([preds[it["id"]]["yes"] for it in sel]))
        keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
        out["average"] = {k: float(np.mean([out[s][k] for s in list(out)])) for k in keys}
        return out
    if kind == "mc":
        hits = {it["id"]: preds[it["id"]]["correct"] if it.get("question_type") == "open"
                else preds[it["id"]]["choice"] == it["answer"] for it in items}
        closed = [it for it in items if it.get("question_type") != "open"]
        out = {"accuracy": float(np.mean(list(hits.values()))), "n": len(items), "open": len(items) - len(closed),
               "unparsed": float(np.mean([preds[it["id"]]["choice"] is None for it in closed])) if closed else 0.0}
        cats = sorted({it.get("category", "all") for it in items})
        if len(cats) > 1:
            out["per_category"] = {c: float(np.mean([hits[it["id"]] for it in items if it.get("category") == c]))
                                   for c in cats}
        return out
    if kind == "files":
        return files_metrics(items, preds)
    scored = [it for it in items if preds[it["id"]]["correct"] is not None]
    out = {"prompts": len(items), "scored_prompts": len(scored),
           "samples": int(sum(len(preds[it["id"]]["correct"] or []) for it in items))}
    if scored:
        tags = [t for t in shapes.TAGS if any(it["metadata"]["tag"] == t for it in scored)]
        per_tag = {t: float(np.mean([c for it in scored if it["metadata"]["tag"] == t
                                     for c in preds[it["id"]]["correct"]])) for t in tags}
        out.update({"overall": float(np.mean(list(per_tag.values()))), "per_tag": per_tag})
    return out


def markdown(suite: str, m: dict) -> str:
    """The metrics as a Markdown table."""
    kind = KIND[suite]
    if kind == "pope":
        rows = ["| split | accuracy | precision | recall | F1 | yes-ratio |", "|---|---|---|---|---|---|"]
        rows += [f"| {s} | " + " | ".join(f"{v[k]:.3f}" for k in ("accuracy", "precision", "recall", "f1",
                                                                      "yes_ratio")) + " |" for s, v in m.items()]
        return "\n".join(rows) + "\n"
    if kind == "mc":
        rows = ["| category | accuracy |", "|---|---|",
                f"| all ({m['n']} questions, {m.get('open', 0)} open) | {m['accuracy']:.3f} |"]
        rows += [f"| {c} | {a:.3f} |" for c, a in m.get("per_category", {}).items()]
        return "\n".join(rows) + f"\n\nunparsed responses: {m['unparsed']:.3f}\n"
    if kind == "files":
        rows = ["| task | records | metric | value |", "|---|---|---|---|"]
        if "understanding" in m:
            u = m["understanding"]
            rows += [f"| understanding | {u['n']} | exact match | {u['exact_match']:.3f} |",
                     f"| understanding | {u['n']} | token F1 | {u['token_f1']:.3f} |"]
        if "generation" in m:
            g = m["generation"]
            rows.append(f"| generation | {g['n']} | image-code loss (nats / code) | {g['image_code_loss']:.4f} |")
        note = "".join(f"\n- {r['source']}: record {r['index']}: {r['reason']}" for r in m["skipped"][:20])
        more = f"\n- ... and {len(m['skipped']) - 20} more" if len(m["skipped"]) > 20 else ""
        return "\n".join(rows) + f"\n\nskipped records: {len(m['skipped'])}{note}{more}\n"
    if "overall" not in m:
        return (f"{m['prompts']} prompts x {m['samples'] // max(m['prompts'], 1)} samples written in GenEval's "
                f"layout; none is scorable by the shapes detector: run GenEval's scorer on them.\n")
    rows = ["| tag | accuracy |", "|---|---|"] + [f"| {t} | {a:.3f} |" for t, a in m["per_tag"].items()]
    rows.append(f"| **overall** | **{m['overall']:.3f}** |")
    return "\n".join(rows) + f"\n\n{m['scored_prompts']} prompts scored, {m['samples']} samples\n"


# -- predictions ---------------------------------------------------------------------------------------
def predict(suite: str, engine, items: list[dict], o: Options, out_dir: pathlib.Path | None = None) -> list[dict]:
    """Predictions for `items` (one dict per item, with its `id`); geneval also writes the samples
    under `out_dir/images` when `out_dir` is given."""
    kind = KIND[suite]
    if kind == "files":
        return predict_files(engine, items, o, out_dir)
    if kind in ("pope", "mc"):
        images = [benchmarks.load_item_image(it) for it in items]
        responses = engine.answer(images, [it["question"] for it in items], max_new_tokens=o.max_new_tokens)
        if kind == "pope":
            return [{"id": it["id"], "response": r, "yes": shapes.answer_is_yes(r)} for it, r in zip(items, responses)]
        out = []
        for it, r in zip(items, responses):
            if it.get("question_type") == "open":
                parsed = parse_open_response(r)
                out.append({"id": it["id"], "response": r, "choice": None, "parsed": parsed,
                            "correct": open_correct(it["answer"], parsed)})
            else:
                out.append({"id": it["id"], "response": r, "choice": extract_choice(r, it["options"])})
        return out
    images = engine.images([it["prompt"] for it in items], num_images=o.samples, guidance=o.cfg,
                           sampling=Sampling(temperature=o.temperature, top_k=o.top_k), seed=o.seed,
                           prompt_ids=[int(it["id"]) for it in items])
    out = []
    for it, imgs in zip(items, images):
        if out_dir is not None:
            write_geneval_folder(out_dir / "images" / it["id"], it["metadata"], imgs)
        spec = benchmarks.metadata_to_spec(it["metadata"], it["id"])
        correct = None if spec is None else [bool(shapes.score(spec, shapes.detect(img))) for img in imgs]
        out.append({"id": it["id"], "correct": correct})
    return out


def _answer_tokens(text: str) -> list[str]:
    """SQuAD's answer normalisation: lower case, punctuation and articles (a, an, the) removed."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return [w for w in text.split() if w not in ("a", "an", "the")]


def token_f1(response: str, reference: str) -> float:
    """SQuAD's token F1 between a response and the reference answer (normalised tokens, multiset overlap)."""
    r, g = _answer_tokens(response), _answer_tokens(reference)
    if not r or not g:
        return float(r == g)
    common = sum(min(r.count(w), g.count(w)) for w in set(r))
    if not common:
        return 0.0
    p, q = common / len(r), common / len(g)
    return 2 * p * q / (p + q)


def predict_files(engine, items: list[dict], o: Options, out_dir: pathlib.Path | None) -> list[dict]:
    """`files`: understanding records answered greedily (exact match and token F1 against the reference,
    every answer kept); caption records scored by their teacher-forced image-code loss, and `o.samples`
    CFG samples per caption written to `out_dir/images/<file>/<index>.png` (a row of samples)."""
    out = []
    und = [it for it in items if it["task"] == "mmu"]
    if und:
        recs = [benchmarks.file_record(it) for it in und]
        images = [r["images"] if r.get("images") else r["image"] for r in recs]
        responses = engine.answer(images, [it["question"] for it in und], max_new_tokens=o.max_new_tokens)
        for it, r in zip(und, responses):
            out.append({"id": it["id"], "task": "mmu", "question": it["question"], "reference": it["answer"],
                        "response": r, "exact": _answer_tokens(r) == _answer_tokens(it["answer"]),
                        "f1": token_f1(r, it["answer"])})
    gen = [it for it in items if it["task"] == "t2i"]
    if gen:
        targets = [benchmarks.file_record(it)["image"] for it in gen]
        losses = engine.image_code_loss(targets, [it["caption"] for it in gen])
        samples = engine.images([it["caption"] for it in gen], num_images=o.samples, guidance=o.cfg,
                                sampling=Sampling(temperature=o.temperature, top_k=o.top_k), seed=o.seed,
                                prompt_ids=[int(it["index"]) for it in gen])
        for it, loss, imgs in zip(gen, losses, samples):
            rec = {"id": it["id"], "task": "t2i", "caption": it["caption"], "image_code_loss": loss}
            if out_dir is not None:
                path = out_dir / "images" / pathlib.Path(it["file"]).name / f"{it['index']:06d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                save_grid(imgs, path, cols=len(imgs))
                rec["samples"] = str(path.relative_to(out_dir))
            out.append(rec)
    return out


def files_metrics(items: list[dict], preds: dict[str, dict]) -> dict:
    out: dict = {"skipped": getattr(items, "skipped", [])}
    und = [preds[it["id"]] for it in items if it["task"] == "mmu"]
    if und:
        out["understanding"] = {"n": len(und), "exact_match": float(np.mean([p["exact"] for p in und])),
                                "token_f1": float(np.mean([p["f1"] for p in und]))}
    gen = [preds[it["id"]]["image_code_loss"] for it in items if it["task"] == "t2i"]
    fits = [v for v in gen if np.isfinite(v)]
    if gen:
        out["generation"] = {"n": len(gen), "image_code_loss": float(np.mean(fits)) if fits else float("nan"),
                             "too_long": len(gen) - len(fits)}
    return out


def write_geneval_folder(folder: pathlib.Path, metadata: dict, images: np.ndarray) -> None:
    """GenEval's generation layout: `metadata.jsonl` (the prompt's line), `samples/<j:04d>.png`, `grid.png`."""
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    for j, img in enumerate(images):
        Image.fromarray(img).save(folder / "samples" / f"{j:04d}.png")
    save_grid(images, folder / "grid.png")
    (folder / "metadata.jsonl").write_text(json.dumps(metadata) + "\n")


# -- resumable runs ------------------------------------------------------------------------------------
class PredictionLog:
    """`predictions.jsonl`: one line per finished item, appended and fsynced batch by batch, so a
    killed evaluation resumes after its last complete batch (a torn last line is dropped)."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.done: dict[str, dict] = {}
        if path.is_file():
            good = 0
            with open(path, "rb") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        break  # torn write of a killed run: drop it and everything after
                    self.done[rec["id"]] = rec
                    good += len(line)
            with open(path, "r+b") as f:
                f.truncate(good)

    def append(self, records: list[dict]) -> None:
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        self.done.update({r["id"]: r for r in records})


def run(suite: str, engine, o: Options, out_dir: pathlib.Path | None = None, *, chunk: int = 32,
        progress: Callable[[int, int], None] | None = None, fingerprint: dict | None = None) -> dict:
    """Evaluates `suite`; with `out_dir`, resumable (predictions logged there) and writes
    `results.json` + `results.md` at the end. Returns the metrics."""
    items = build_items(suite, o)
    ids = [it["id"] for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"suite {suite}: item ids are not unique")
    log = None
    fresh = out_dir is not None and not (out_dir / "suite.json").is_file()
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        check_fingerprint(out_dir / "suite.json", {"suite": suite, "options": dataclasses.asdict(o),
                                                   "items": len(items), **(fingerprint or {})})
        log = PredictionLog(out_dir / "predictions.jsonl")
    preds: dict[str, dict] = dict(log.done) if log else {}
    todo = [it for it in items if it["id"] not in preds]
    if KIND[suite] == "geneval":
        chunk = max(1, chunk // o.samples)
    try:
        for start in range(0, len(todo), chunk):
            batch = todo[start:start + chunk]
            recs = predict(suite, engine, batch, o, out_dir)
            if log:
                log.append(recs)
            preds.update({r["id"]: r for r in recs})
            if progress:
                progress(len(items) - len(todo) + start + len(batch), len(items))
    except BaseException:
        if fresh and not preds:  # failed before its first prediction: nothing to resume, nothing left behind
            for name in ("suite.json", "predictions.jsonl"):
                (out_dir / name).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only when empty
        raise
    m = metrics(suite, items, preds)
    if out_dir is not None:
        result = {"suite": suite, "options": dataclasses.asdict(o), **(fingerprint or {}), "metrics": m}
        write_outputs(out_dir, {"results.json": lambda p: p.write_text(json.dumps(result, indent=2) + "\n"),
                                "results.md": lambda p: p.write_text(f"# {suite}\n\n" + markdown(suite, m))})
    return m


def check_fingerprint(path: pathlib.Path, want: dict) -> None:
    want = json.loads(json.dumps(want))  # tuples -> lists, as read back
    if path.is_file():
        have = json.loads(path.read_text())
        if have != want:
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            raise ValueError(f"{path.parent} holds an evaluation with other settings ({', '.join(diff)} differ); "
                             f"pass --overwrite to start it again or choose another --out")
        return
    path.write_text(json.dumps(want, indent=2) + "\n")
