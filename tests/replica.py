"""A full-format replica of fine-tuning Janus-Pro on your own data, built locally (no downloads).

`build(root)` writes what a user starts from, in the released formats and at toy sizes:
- `Janus-Pro-tiny/`: a tiny random transformers `JanusForConditionalGeneration` saved with a
  tokenizer that has Janus-Pro's special tokens in DeepSeek's order (bos 0, eos 1, pad 2, image
  placeholder 3, begin / end of image 4 / 5) and its chat roles, as a downloaded checkpoint holds;
- `data/`: a few dozen images of mixed sizes and aspect ratios (PNG and JPEG) with LLaVA-style
  conversations (multi-turn, text-only, two-image), captions as JSONL and as parquet;
- `pope/`: POPE's three question files and a `val2014/` image folder;
- `MMMU/`: a folder per subject with `validation-00000-of-00001.parquet` (multiple choice with
  images in the options, open questions).
`tests/test_replica.py` then runs the recipe through the CLIs; docs/finetune_janus_pro.md shows
the same commands at full size.
"""

from __future__ import annotations

import io
import json
import pathlib

import hf_models
import numpy as np
from PIL import Image

from unijax.data import shapes

ORDER = ("bos", "eos", "pad", "image", "boi", "eoi")  # DeepSeek's tokenizer order of the specials
SIZES = [(32, 32), (48, 64), (64, 48), (40, 100), (90, 30), (57, 57), (120, 80), (24, 36), (200, 150)]


def _model(directory: pathlib.Path, vocab: int) -> None:
    import torch
    from transformers import JanusForConditionalGeneration

    cfg = hf_models.tiny_config(gqa=True)
    # as Janus-Pro: the VQ grid equals the vision patch grid (4 x 4 here, 24 x 24 there), so the
    # images of both directions share one size (32 px; 384 there)
    cfg.vq_config.channel_multiplier = [1, 2, 2, 2]
    cfg.vq_config.num_patches = cfg.vision_config.image_size // cfg.vision_config.patch_size
    ids = {r: i for i, r in enumerate(ORDER)}
    cfg.text_config.vocab_size = vocab
    cfg.text_config.bos_token_id, cfg.text_config.eos_token_id = ids["bos"], ids["eos"]
    cfg.text_config.pad_token_id = ids["pad"]
    cfg.image_token_id = ids["image"]
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(cfg).eval()
    hf_models.rerandomize(model, 0)
    gc = model.generation_config
    gc._from_model_config = False
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = ids["bos"], ids["eos"], ids["pad"]
    gc.generation_kwargs = {"boi_token_id": ids["boi"], "eoi_token_id": ids["eoi"]}
    model.save_pretrained(directory)


def _image(seed: int, index: int, hw: tuple[int, int]) -> np.ndarray:
    """A shapes scene stretched to `hw` (a photo's mixed sizes and aspect ratios)."""
    scene = shapes.scene_at(seed, index, 64)
    return np.asarray(Image.fromarray(shapes.render(scene)).resize((hw[1], hw[0]), Image.BICUBIC))


def _save(image: np.ndarray, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=90) if path.suffix == ".jpg" else Image.fromarray(image).save(path)


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def build(root) -> dict[str, pathlib.Path]:
    """Writes the replica under `root`; returns its paths by name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = pathlib.Path(root)
    data, rng = root / "data", np.random.default_rng(0)
    convs, captions, corpus = [], [], []
    for i in range(36):
        hw = SIZES[i % len(SIZES)]
        rel = f"images/{i:03d}.{'jpg' if i % 3 == 0 else 'png'}"
        image = _image(0, i, hw)
        _save(image, data / rel)
        scene = shapes.scene_at(0, i, 64)
        qas = [shapes.sample_question(scene, rng) for _ in range(2 if i % 4 == 0 else 1)]
        turns = [{"from": f, "value": v} for k, qa in enumerate(qas)
                 for f, v in (("human", ("<image>\n" if k == 0 else "") + qa.question), ("gpt", qa.answer))]
        convs.append({"id": f"c{i}", "image": rel, "conversations": turns})
        prompt, _ = shapes.t2i_prompt(scene, rng)
        captions.append({"image": rel, "caption": prompt})
        corpus += [qa.question + " " + qa.answer for qa in qas] + [prompt]
    convs.append({"id": "text0", "conversations": [{"from": "human", "value": "what colours can a shape have?"},
                                                   {"from": "gpt", "value": "red, green, blue, yellow, purple or cyan"}]})
    convs.append({"id": "two", "image": ["images/001.png", "images/002.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nhow many objects are in the two images?"},
        {"from": "gpt", "value": "4"}]})
    (data / "llava.json").write_text(json.dumps(convs, indent=1))
    (data / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions[:18]))
    half = captions[18:]
    pq.write_table(pa.table({"image": [{"bytes": (data / c["image"]).read_bytes(), "path": c["image"]} for c in half],
                             "caption": [c["caption"] for c in half]}), data / "captions.parquet", row_group_size=8)

    # POPE: three splits over a val2014 folder of COCO-named JPEGs
    pope = root / "pope"
    for k in range(4):
        _save(_image(7, k, SIZES[k + 1]), pope / "val2014" / f"COCO_val2014_{k:012d}.jpg")
    for split in ("random", "popular", "adversarial"):
        lines = []
        for k in range(4):
            scene = shapes.scene_at(7, k, 64)
            obj = scene.objects[0]
            lines.append({"question_id": 2 * k, "image": f"COCO_val2014_{k:012d}.jpg",
                          "text": f"Is there a {obj.shape} in the image?", "label": "yes"})
            absent = next(s for s in shapes.SHAPES if s not in {o.shape for o in scene.objects}) \
                if len({o.shape for o in scene.objects}) < len(shapes.SHAPES) else "dog"
            lines.append({"question_id": 2 * k + 1, "image": f"COCO_val2014_{k:012d}.jpg",
                          "text": f"Is there a {absent} in the image?", "label": "no"})
        (pope / f"coco_pope_{split}.json").write_text("".join(json.dumps(x) + "\n" for x in lines))

    # MMMU: one folder per subject, the release's columns
    none = {"bytes": None, "path": None}
    img = [{"bytes": _png_bytes(_image(9, k, SIZES[k])), "path": f"{k}.png"} for k in range(3)]
    subjects = {
        "Art": dict(id=["validation_Art_1", "validation_Art_2"],
                    question=["<image 1> What colour is the largest object?", "Which image shows more objects?"],
                    options=[str(["red", "green", "blue", "cyan"]), str(["<image 1>", "<image 2>"])],
                    answer=["A", "B"], question_type=["multiple-choice", "multiple-choice"],
                    image_1=[img[0], img[1]], image_2=[none, img[2]], subfield=["Painting", "Design"]),
        "Math": dict(id=["validation_Math_1"], question=["<image 1> How many objects are there?"],
                     options=["[]"], answer=["2"], question_type=["open"], image_1=[img[2]], image_2=[none],
                     subfield=["Counting"]),
    }
    for subject, cols in subjects.items():
        (root / "MMMU" / subject).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols), root / "MMMU" / subject / "validation-00000-of-00001.parquet")

    hf = root / "Janus-Pro-tiny"
    hf_models.save_janus_tokenizer(hf, corpus, vocab_size=600, declare=True)
    vocab = len(__import__("transformers").AutoTokenizer.from_pretrained(str(hf), local_files_only=True))
    _model(hf, max(vocab, 64))
    return {"hf": hf, "data": data, "pope": pope, "mmmu": root / "MMMU"}
