"""`unijax.generate`, `unijax.evaluate` and `unijax.analyze conflict` on a tiny saved checkpoint.

The model is random (quick_model), so answers and images are meaningless; what is checked is the
mechanics a trained model relies on: batching and padding never change a result, sampling keys
are per (prompt, sample), outputs land where and as documented (GenEval's folder layout), a killed
evaluation resumes to the uninterrupted result, metrics equal float64 numpy, real benchmark files
load, and gradient cosines have the sign of a toy problem built to conflict.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from test_analyze import quick_model

from unijax import analyze, checkpoints, evaluate, generate
from unijax.analysis import conflict
from unijax.data import benchmarks, shapes
from unijax.inference import suites
from unijax.inference.engine import Engine
from unijax.inference.sampling import Sampling
from unijax.models import lora
from unijax.models.family import preset
from unijax.training.config import validate

REPO = pathlib.Path(__file__).resolve().parents[1]


def small_cfg(**kw):
    return preset("tiny", text={"num_layers": 2}, **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """workdir/{model, config.json} as a training run leaves them."""
    workdir = tmp_path_factory.mktemp("gen")
    checkpoints.save_model(workdir / "model", quick_model(small_cfg(), seed=3))
    (workdir / "config.json").write_text(json.dumps({"seed": 5, "data": {"dir": str(REPO / "data")},
                                                     "train": {"batch_size": 4, "eval_batches": 2}}))
    return workdir


@pytest.fixture(scope="module")
def engine(run):
    return Engine.load(run / "model", batch_size=4)


def scene_images(n):
    return [shapes.render(shapes.scene_at(1, i)) for i in range(n)]


def test_answers_do_not_depend_on_batching(engine, run):
    qs = ["what colour is the circle?", "how many squares are there?", "describe the image.",
          "is there a red circle in the image?", "what shape is the blue object?"]
    imgs = scene_images(len(qs))
    together = engine.answer(imgs, qs, max_new_tokens=6)
    alone = Engine.load(run / "model", batch_size=1)
    assert [alone.answer([i], [q], max_new_tokens=6)[0] for i, q in zip(imgs, qs)] == together
    # the padded rows and the left padding do not leak: a longer neighbour leaves a row unchanged
    assert engine.answer([imgs[0], imgs[1]], [qs[0], qs[2] + " " + qs[2]], max_new_tokens=6)[0] == together[0]


def test_multi_image_questions_do_not_depend_on_batching(engine, run):
    """A question with two `<image>` marks (MMMU's multi-image items) beside one-image questions:
    the same answers batched as alone, and a one-image row is unchanged by its two-image neighbour."""
    imgs = scene_images(3)
    two = "is <image> the same as <image>?"
    together = engine.answer([[imgs[0], imgs[1]], imgs[2]], [two, "what colour is the circle?"], max_new_tokens=6)
    alone = Engine.load(run / "model", batch_size=1)
    assert alone.answer([[imgs[0], imgs[1]]], [two], max_new_tokens=6) == together[:1]
    assert alone.answer([imgs[2]], ["what colour is the circle?"], max_new_tokens=6) == together[1:]


def test_images_per_prompt_keys(engine, run):
    s = Sampling(temperature=1.0, top_k=50)
    both = engine.images(["a red circle", "two blue squares"], num_images=3, sampling=s, seed=4)
    assert both.shape == (2, 3, 32, 32, 3) and both.dtype == np.uint8
    alone = Engine.load(run / "model", batch_size=2).images(["two blue squares"], num_images=3, sampling=s, seed=4,
                                                            prompt_ids=[1])
    np.testing.assert_array_equal(alone[0], both[1])
    assert not np.array_equal(both[0, 0], both[0, 1])  # samples differ from each other
    other_seed = engine.images(["a red circle"], num_images=1, sampling=s, seed=5)
    assert not np.array_equal(other_seed[0, 0], both[0, 0])


def test_generate_cli(run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    res = generate.main(["--ckpt", str(run / "model"), "--prompt", "a red circle", "--prompt", "a square",
                         "--num_images", "3", "--out", str(out), "--batch_size", "4"])
    assert res["grid"] == str(out)
    grid = np.asarray(Image.open(out))
    # 2 rows x 3 images of 32 px upscaled x4 to 128, 2 px gaps
    assert grid.shape == (2 + 2 * 130, 2 + 3 * 130, 3)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["prompts"] == ["a red circle", "a square"] and meta["cfg"] == 5.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.json", "grid.png"]  # no partial file left
    img = tmp_path / "scene.png"
    Image.fromarray(scene_images(1)[0]).save(img)
    res = generate.main(["--ckpt", str(run / "model"), "--image", str(img), "--question", "what colour is the circle?",
                         "--max_new_tokens", "4"])
    assert len(res["answers"]) == 1 and "A: " in capsys.readouterr().out
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(SystemExit) as e:
        generate.main(["--ckpt", str(run / "model"), "--image", str(tmp_path / "bad.png"), "--question", "q"])
    assert e.value.code == 2 and "bad.png" in capsys.readouterr().err


# -- metrics ------------------------------------------------------------------------------------------
def test_pope_scores_against_numpy():
    rng = np.random.default_rng(0)
    truth, pred = rng.random(200) < 0.5, rng.random(200) < 0.6
    m = suites.pope_scores(truth, pred)
    t, p = truth.astype(np.float64), pred.astype(np.float64)
    tp, fp, fn = (t * p).sum(), ((1 - t) * p).sum(), (t * (1 - p)).sum()
    prec, rec = tp / (tp + fp), tp / (tp + fn)
    assert m["accuracy"] == pytest.approx((truth == pred).mean(), abs=1e-12)
    assert m["precision"] == pytest.approx(prec) and m["recall"] == pytest.approx(rec)
    assert m["f1"] == pytest.approx(2 * prec * rec / (prec + rec)) and m["yes_ratio"] == pytest.approx(p.mean())


@pytest.mark.parametrize("response,expected", [
    ("b", "B"), ("B.", "B"), ("(C) green", "C"), ("The answer is D", "D"), ("A or B? B", "B"),
    ("i think the colour of it is clearly green here", "C"), ("none", None), ("", None)])
def test_extract_choice_mmmu_rules(response, expected):
    assert suites.extract_choice(response, ["red", "blue", "green", "yellow"]) == expected


def test_shapes_pope_splits_are_balanced():
    items = benchmarks.shapes_pope_items(3, 40)
    for split in shapes.EXIST_NEGATIVE_KINDS:
        answers = [it["answer"] for it in items if split in it["splits"]]
        assert 0.4 <= np.mean([a == "yes" for a in answers]) <= 0.6, split


# -- evaluate -----------------------------------------------------------------------------------------
def test_evaluate_suites_and_resume(run, tmp_path, monkeypatch):
    args = ["--ckpt", str(run / "model"), "--batch_size", "4", "--max_new_tokens", "4"]
    pope = evaluate.main(args + ["--suite", "shapes_pope", "--num_images", "10", "--out", str(tmp_path / "pope")])
    for split in ("random", "popular", "adversarial", "average"):
        assert all(np.isfinite(pope[split][k]) for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"))
    md = (tmp_path / "pope" / "results.md").read_text()
    assert "| adversarial |" in md and json.loads((tmp_path / "pope" / "results.json").read_text())["metrics"] == pope

    # killed after its first chunk of 16 items, then rerun: only the rest is predicted, same result
    real, calls = suites.predict, []

    def dying(suite, engine, items, *a, **k):
        calls.append(len(items))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(suite, engine, items, *a, **k)

    monkeypatch.setattr(suites, "predict", dying)
    mc_args = args + ["--suite", "shapes_mc", "--num_questions", "40", "--out", str(tmp_path / "mc")]
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(mc_args)
    assert len((tmp_path / "mc" / "predictions.jsonl").read_text().splitlines()) == 16
    with open(tmp_path / "mc" / "predictions.jsonl", "a") as f:
        f.write('{"id": "17", "resp')  # a torn last line, as a kill during the write leaves it
    calls.clear()
    monkeypatch.setattr(suites, "predict", lambda *a, **k: (calls.append(len(a[2])), real(*a, **k))[1])
    resumed = evaluate.main(mc_args)
    assert sum(calls) == 24
    fresh = evaluate.main(args + ["--suite", "shapes_mc", "--num_questions", "40", "--out", str(tmp_path / "mc2")])
    assert resumed == fresh and 0 <= fresh["accuracy"] <= 1 and set(fresh["per_category"]) == {"colour", "count"}
    with pytest.raises(SystemExit):  # other settings into the same --out
        evaluate.main(args + ["--suite", "shapes_mc", "--num_questions", "30", "--out", str(tmp_path / "mc")])

    # failing before its first prediction (an image that is not there) leaves no --out behind
    monkeypatch.setattr(suites, "predict", real)
    (tmp_path / "coco_pope_random.json").write_text(json.dumps(
        {"question_id": 1, "image": "gone.jpg", "text": "Is there a dog?", "label": "no"}) + "\n")
    with pytest.raises(SystemExit):
        evaluate.main(args + ["--suite", "pope", "--files", str(tmp_path / "coco_pope_random.json"),
                              "--image_root", str(tmp_path), "--out", str(tmp_path / "failed")])
    assert not (tmp_path / "failed").exists()


def test_geneval_folder_layout_and_scores(run, tmp_path):
    out = tmp_path / "gen"
    m = evaluate.main(["--ckpt", str(run / "model"), "--suite", "shapes_geneval", "--per_tag", "1", "--samples", "2",
                       "--batch_size", "4", "--out", str(out)])
    folders = sorted((out / "images").iterdir())
    assert [f.name for f in folders] == [f"{k:05d}" for k in range(len(shapes.TAGS))]
    for f in folders:
        assert sorted(p.name for p in (f / "samples").iterdir()) == ["0000.png", "0001.png"]
        meta = json.loads((f / "metadata.jsonl").read_text())
        assert {"tag", "include", "prompt"} <= set(meta)
    assert set(m["per_tag"]) == set(shapes.TAGS) and m["samples"] == 2 * len(shapes.TAGS)
    assert m["overall"] == pytest.approx(np.mean(list(m["per_tag"].values())))


def test_geneval_metadata_round_trip_scores_clean_renders():
    """The metadata our suite writes, read back as GenEval's format, scores the scenes it describes."""
    prompts = shapes.prompt_set(2, 5)
    for text, spec, scene in prompts:
        meta = benchmarks.spec_to_metadata(text, spec)
        back = benchmarks.metadata_to_spec(json.loads(json.dumps(meta)), "test")
        assert back == spec
        assert shapes.score(back, shapes.detect(shapes.render(scene)))
    coco = {"tag": "two_object", "include": [{"class": "bench", "count": 1}, {"class": "dog", "count": 1}],
            "prompt": "a photo of a bench and a dog"}
    assert benchmarks.metadata_to_spec(coco, "test") is None  # COCO classes: GenEval's scorer only


def test_real_file_loaders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    imgs = tmp_path / "val2014"
    imgs.mkdir()
    Image.fromarray(scene_images(1)[0]).save(imgs / "COCO_val2014_000000000001.jpg")
    lines = [{"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a circle?", "label": "yes"},
             {"question_id": 2, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a dog?", "label": "no"}]
    pope = tmp_path / "coco_pope_adversarial.json"
    pope.write_text("".join(json.dumps(l) + "\n" for l in lines))
    items = benchmarks.pope_items([str(pope)], str(imgs))
    assert [it["splits"] for it in items] == [["adversarial"]] * 2 and items[1]["answer"] == "no"
    assert benchmarks.load_item_image(items[0]).shape == (32, 32, 3)

    buf = __import__("io").BytesIO()
    Image.fromarray(scene_images(2)[1]).save(buf, format="PNG")
    table = pa.table({"id": ["validation_Art_1"], "question": ["<image 1> What colour is the square?"],
                      "options": [str(["red", "blue", "green"])], "answer": ["B"],
                      "image_1": [{"bytes": buf.getvalue(), "path": None}], "subfield": ["Art"]})
    pq.write_table(table, tmp_path / "mmmu.parquet")
    (mc,) = benchmarks.mc_items(str(tmp_path / "mmmu.parquet"))
    assert mc["question"].startswith("What colour is the square?\nA. red\nB. blue\nC. green\n")
    assert mc["answer"] == "B" and mc["category"] == "Art"
    assert benchmarks.load_item_image(mc).shape == (32, 32, 3)

    # POPE as lmms-lab/POPE's parquet: the images inside, the split in `category`
    lmms = pa.table({"id": ["0", "1"], "question_id": ["1", "2"], "question": ["Is there a circle?", "Is there a dog?"],
                     "answer": ["yes", "no"], "image_source": ["COCO_val2014_000000000001"] * 2,
                     "image": [{"bytes": buf.getvalue(), "path": None}] * 2, "category": ["adversarial", "random"]})
    pq.write_table(lmms, tmp_path / "test-00000-of-00003.parquet")
    items = benchmarks.pope_items([str(tmp_path / "test-00000-of-00003.parquet")], "")
    assert [it["splits"] for it in items] == [["adversarial"], ["random"]] and [it["answer"] for it in items] == ["yes", "no"]
    assert items[0]["id"] == "adversarial/1" and benchmarks.load_item_image(items[1]).shape == (32, 32, 3)
    (tmp_path / "empty_pope_random.json").write_text("")
    with pytest.raises(benchmarks.BenchmarkFileError, match="empty_pope_random.json: no POPE records"):
        benchmarks.pope_items([str(tmp_path / "empty_pope_random.json")], str(imgs))

    bad = tmp_path / "bad_pope_random.json"
    bad.write_text(json.dumps({"question_id": 1, "image": "x.jpg", "label": "maybe", "text": "?"}) + "\n")
    with pytest.raises(benchmarks.BenchmarkFileError, match="bad_pope_random.json: record 0"):
        benchmarks.pope_items([str(bad)], str(imgs))
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text(json.dumps({"tag": "single_object", "include": [{"class": "circle", "count": 1}],
                                "prompt": "a photo of a circle"}) + "\n{not json\n")
    with pytest.raises(benchmarks.BenchmarkFileError, match="line 2"):
        benchmarks.geneval_items(str(meta))


def test_mmmu_layout_open_and_multi_image_questions(tmp_path):
    """MMMU's layout (a folder per subject with <split>-00000-of-00001.parquet): open questions get
    the single-phrase instruction and MMMU's open scoring; `<image k>` marks in the question and the
    options become images at their places, in order; POPE questions get the instruction."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from unijax.contract import IMAGE_MARKER

    def png(k):
        buf = __import__("io").BytesIO()
        Image.fromarray(scene_images(3)[k]).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    none = {"bytes": None, "path": None}
    rows = {
        "Art": dict(id=["validation_Art_1"], question=["Which is bigger, <image 2> or <image 1>?"],
                    options=[str(["<image 1>", "<image 2>"])], answer=["A"], question_type=["multiple-choice"],
                    image_1=[png(0)], image_2=[png(1)], subfield=["Painting"]),
        "Math": dict(id=["validation_Math_1", "validation_Math_2"], question=["<image 1> How many sides?", "Sum?"],
                     options=["[]", "[]"], answer=["4", "['1,000', '1000.0']"], question_type=["open", "open"],
                     image_1=[png(2), png(2)], image_2=[none, none], subfield=["Geometry", "Algebra"]),
    }
    for subject, cols in rows.items():
        (tmp_path / "MMMU" / subject).mkdir(parents=True)
        pq.write_table(pa.table(cols), tmp_path / "MMMU" / subject / "validation-00000-of-00001.parquet")
        pq.write_table(pa.table(cols), tmp_path / "MMMU" / subject / "dev-00000-of-00001.parquet")
    items = {it["id"]: it for it in benchmarks.mc_items([str(tmp_path / "MMMU")])}
    assert sorted(items) == ["validation_Art_1", "validation_Math_1", "validation_Math_2"]
    art = items["validation_Art_1"]
    assert art["question"] == (f"Which is bigger, {IMAGE_MARKER} or {IMAGE_MARKER}?\nA. {IMAGE_MARKER}\n"
                               f"B. {IMAGE_MARKER}\n{benchmarks.MC_INSTRUCTION}")
    imgs = benchmarks.load_item_image(art)  # in mark order: image 2, image 1, then the options' 1, 2
    want = scene_images(3)
    assert [int(np.argmin([np.abs(im.astype(int) - w).sum() for w in want[:2]])) for im in imgs] == [1, 0, 0, 1]
    m1 = items["validation_Math_1"]
    assert m1["question_type"] == "open" and m1["question"] == f"How many sides?\n{benchmarks.OPEN_INSTRUCTION}"
    assert items["validation_Math_2"]["answer"] == ["1,000", "1000.0"]
    assert benchmarks.load_item_image(m1).shape == (32, 32, 3)
    with pytest.raises(benchmarks.BenchmarkFileError, match="no test-\\*.parquet"):
        benchmarks.mc_items([str(tmp_path / "MMMU")], split="test")

    # MMMU's open-answer rules
    assert suites.parse_open_response("The answer is 4.") == [4.0]
    assert suites.parse_open_response("x = 3.14159\nso it is pi") == ["pi"]  # "=" counts in the last sentence only
    assert suites.parse_open_response("so it is about 3.14159") == ["about 3.14159", 3.14]
    assert suites.open_correct("4", suites.parse_open_response("It has 4 sides, so the answer is 4"))
    assert not suites.open_correct("4", suites.parse_open_response("five"))
    assert suites.open_correct(["1,000", "1000.0"], suites.parse_open_response("the sum is 1,000"))
    assert suites.open_correct("Monet", suites.parse_open_response("I think it is claude monet."))
    assert not suites.open_correct("a", suites.parse_open_response("banana"))  # one letter: no substring match
    preds = {"validation_Art_1": {"choice": "A"}, "validation_Math_1": {"choice": None, "correct": True},
             "validation_Math_2": {"choice": None, "correct": False}}
    m = suites.metrics("mmmu", list(items.values()), preds)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["open"] == 2 and m["unparsed"] == 0.0

    pope = tmp_path / "coco_pope_random.json"
    pope.write_text(json.dumps({"question_id": 1, "image": "x.jpg", "text": "Is there a dog?", "label": "no"}) + "\n")
    (it,) = benchmarks.pope_items([str(pope)], str(tmp_path))
    assert it["question"] == f"Is there a dog?\n{benchmarks.OPEN_INSTRUCTION}"
    (it,) = benchmarks.pope_items([str(pope)], str(tmp_path), instruction="")
    assert it["question"] == "Is there a dog?"


# -- LoRA adapter directories ---------------------------------------------------------------------------
def test_adapter_directory_loads_merged(tmp_path):
    cfg = small_cfg()
    model = quick_model(cfg, seed=1)
    checkpoints.save_model(tmp_path / "base", model)
    params = checkpoints.flat_params(model)
    pure = __import__("flax").nnx.to_pure_dict(__import__("flax").nnx.state(model, __import__("flax").nnx.Param))
    adapters, _ = lora.init(pure, (r".*self_attn/(q|v)_proj/kernel",), 4, jax.random.key(0))
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # non-zero B
    trained = {"lm_head": {"kernel": np.asarray(pure["lm_head"]["kernel"]) * 2}}
    info = {"rank": 4, "alpha": 8.0, "scale": 2.0, "dropout": 0.0, "targets": [".*self_attn/(q|v)_proj/kernel"]}
    checkpoints.save_adapters(tmp_path / "adapters", cfg, adapters, trained, info, base=str(tmp_path / "base"))
    got = checkpoints.flat_params(checkpoints.load_model(tmp_path / "adapters"))
    pure["lm_head"]["kernel"] = trained["lm_head"]["kernel"]
    want = {k.replace("/", "."): v for k, v in
            {lora.path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(lora.merge(pure, adapters, 2.0))}.items()}
    assert set(got) == set(want) == set(params)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6, atol=1e-7, err_msg=k)
    q = "language_model.layers.0.self_attn.q_proj.kernel"
    assert not np.allclose(np.asarray(got[q]), np.asarray(params[q]))


# -- conflict -------------------------------------------------------------------------------------------
def test_conflict_sign_on_a_toy_pair():
    """Two quadratic losses 0.5 |w - a|^2 and 0.5 |w - b|^2 at w = 0: the gradients are -a and -b, so
    each group's cosine is cos(a, b): built negative for attention, positive for the FFN."""
    rng = np.random.default_rng(0)
    a_att, a_ffn = rng.normal(size=(8, 4)), rng.normal(size=(8, 6))
    b_att = -a_att + 0.3 * rng.normal(size=(8, 4))   # conflicting
    b_ffn = a_ffn + 0.3 * rng.normal(size=(8, 6))    # aligned
    targets = {"mmu": {"language_model/layers/0/self_attn/q_proj/kernel": a_att,
                       "language_model/layers/0/mlp/up_proj/kernel": a_ffn},
               "t2i": {"language_model/layers/0/self_attn/q_proj/kernel": b_att,
                       "language_model/layers/0/mlp/up_proj/kernel": b_ffn}}

    def grad_fn(task, batch):
        w = {k: jnp.zeros(v.shape) for k, v in targets[task].items()}
        return jax.grad(lambda p: sum(0.5 * jnp.sum((p[k] - targets[task][k]) ** 2) for k in p))(w)

    stats = conflict.conflict_stats(None, [0, 1], [0, 1], (1, 1), grad_fn=grad_fn)
    cos = {(g["scope"], g["group"]): g["cosine"] for g in stats["groups"]}

    def np_cos(x, y):
        return float(x.ravel() @ y.ravel() / np.linalg.norm(x) / np.linalg.norm(y))

    assert cos[("layer0", "attention")] < -0.8 and cos[("layer0", "ffn")] > 0.8
    assert cos[("layer0", "attention")] == pytest.approx(np_cos(a_att, b_att), rel=1e-6)  # float32 gradients
    both_a, both_b = np.concatenate([a_att.ravel(), a_ffn.ravel()]), np.concatenate([b_att.ravel(), b_ffn.ravel()])
    assert cos[("layer0", "all")] == pytest.approx(np_cos(both_a, both_b), rel=1e-6)


def test_analyze_conflict_cli(run):
    stats = analyze.main(["conflict", "--ckpt", str(run / "model"), "--num_batches", "1", "--batch_size", "4"])
    out = run / "analysis"
    assert {"conflict.json", "conflict.png"} <= {p.name for p in out.iterdir()}
    by = {(g["scope"], g["group"]): g for g in stats["groups"]}
    assert by[("model", "vision")]["cosine"] is None and by[("model", "vision")]["norm_t2i"] == 0  # T2I never sees it
    assert by[("model", "generation")]["norm_mmu"] == 0
    for i in range(2):
        for group in ("attention", "ffn", "all"):
            assert -1 <= by[(f"layer{i}", group)]["cosine"] <= 1
    assert ("model", "vq") not in by  # the frozen tokenizer is not analysed


def test_training_runs_suites(tmp_path):
    """eval_suites.names in a training run: each suite's metrics land in metrics.jsonl as suite/<name>/..."""
    from test_train import tiny_config

    from unijax.training import loop

    c = tiny_config(tmp_path / "run", REPO / "data", steps=2, checkpoint_every=2)
    c.model.text.num_layers = 2
    c.eval_suites.update(names=("shapes_pope", "shapes_mc", "shapes_geneval"), every=2, num_images=3,
                         num_questions=4, per_tag=1, samples=1, batch_size=4)
    loop.train(c, devices=jax.devices()[:1])
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    suite_rows = [r for r in rows if any(k.startswith("suite/") for k in r)]
    assert len(suite_rows) == 1 and suite_rows[0]["step"] == 2
    keys = set(suite_rows[0])
    assert {"suite/shapes_pope/average/accuracy", "suite/shapes_pope/adversarial/f1", "suite/shapes_mc/accuracy",
            "suite/shapes_geneval/overall", "suite/shapes_geneval/per_tag/position"} <= keys
    c.eval_suites.names = ("shapes_pope", "popee")
    with pytest.raises(ValueError, match="eval_suites.names"):
        validate(c)


def test_ta_moe_groups_decoupled_by_label_routing(tmp_path):
    """Under label routing each task reaches only its own expert group: expert and in-group router
    gradients of the two tasks are disjoint (cosine exactly 0), the shared expert and attention are not."""
    assert conflict.param_group("language_model/layers/3/mlp/alpha") == ("layer3", "shared_expert")
    assert conflict.param_group("language_model/layers/0/mlp/task_router/kernel") == ("layer0", "routers")
    assert conflict.param_group("language_model/layers/1/mlp/up_proj/kernel") == ("layer1", "ffn")
    assert conflict.param_group("aligner/fc1/kernel") == ("model", "vision")
    cfg = preset("tiny", text={"num_layers": 1}, ffn="ta_moe", moe={"num_experts_per_group": 2, "top_k": 1})
    checkpoints.save_model(tmp_path / "model", quick_model(cfg, seed=2))
    (tmp_path / "config.json").write_text(json.dumps({"seed": 1, "data": {"dir": str(REPO / "data")}}))
    stats = analyze.main(["conflict", "--ckpt", str(tmp_path / "model"), "--num_batches", "1", "--batch_size", "4"])
    by = {(g["scope"], g["group"]): g for g in stats["groups"]}
    assert by[("layer0", "experts")]["cosine"] == 0.0 and by[("layer0", "experts")]["norm_t2i"] > 0
    assert by[("layer0", "shared_expert")]["cosine"] != 0.0 and by[("layer0", "attention")]["cosine"] != 0.0


def test_evaluate_files_suite_on_your_held_out_data(run, engine, tmp_path):
    """`--suite files --data`: understanding records answered (exact match, token F1, every answer
    kept), caption records scored by the teacher-forced image-code loss (equal to training's held-out
    `lm_eval` CE, 1e-5 relative) with CFG samples saved; bad and text-only records skipped with their
    reasons; resumable (a rerun predicts nothing and gives the same result)."""
    from unijax.data import pipeline
    from unijax.training import losses

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    convs, caps = [], []
    for i in range(4):
        scene = shapes.scene_at(7, i)
        Image.fromarray(shapes.render(scene)).save(tmp_path / "img" / f"{i}.png")
        qa = shapes.sample_question(scene, rng)
        convs.append({"image": f"img/{i}.png", "conversations": [{"from": "human", "value": "<image>\n" + qa.question},
                                                                 {"from": "gpt", "value": qa.answer}]})
        caps.append({"image": f"img/{i}.png", "caption": shapes.t2i_prompt(scene, rng)[0]})
    convs[1] = {"conversations": [{"from": "human", "value": "what is a circle?"}, {"from": "gpt", "value": "round"}]}
    convs[2]["image"] = "img/missing.png"
    (tmp_path / "heldout.json").write_text(json.dumps(convs))
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in caps[:2]))
    args = ["--ckpt", str(run / "model"), "--batch_size", "4", "--max_new_tokens", "4", "--suite", "files",
            "--data", f"{tmp_path / 'heldout.json'},{tmp_path / 'captions.jsonl'}", "--samples", "2",
            "--out", str(tmp_path / "eval")]
    m = evaluate.main(args)
    assert m["understanding"]["n"] == 2 and m["generation"]["n"] == 2
    assert 0 <= m["understanding"]["exact_match"] <= m["understanding"]["token_f1"] <= 1
    assert sorted((r["index"], r["reason"].split(" (")[0]) for r in m["skipped"]) == [
        (1, "a text-only conversation"), (2, "image 'img/missing.png' not found under " + str(tmp_path))]
    preds = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert {p["id"] for p in preds} == {"heldout.json/0", "heldout.json/3", "captions.jsonl/0", "captions.jsonl/1"}
    assert all("response" in p and "reference" in p for p in preds if p["task"] == "mmu")
    grid = Image.open(tmp_path / "eval" / "images" / "captions.jsonl" / "000000.png")
    assert grid.size[0] > grid.size[1]  # a row of the 2 samples
    md = (tmp_path / "eval" / "results.md").read_text()
    assert "| generation | 2 | image-code loss" in md and "skipped records: 2" in md
    # the image-code loss is training's held-out image CE on the same pair
    layout = pipeline.Layout.from_model(engine.cfg, max_len=128)
    image = np.asarray(Image.open(tmp_path / "img" / "0.png").convert("RGB"))
    x = pipeline.pad_sample(pipeline.encode_sample({"task": "t2i", "image": image, "caption": caps[0]["caption"]},
                                                   engine.tokenizer, layout), 128)
    batch = {k: jnp.asarray(x[k][None]) for k in ("tokens", "modality", "task", "text_weights", "image_weights",
                                                   "patches", "bad", "segment_ids", "positions")}
    r = losses.lm_eval(engine.model, batch, images_per_row=(0, 1), chunk_size=0)
    want = float(r["image_ce_sum"][0] / r["image_tokens"][0])
    got = [p for p in preds if p["id"] == "captions.jsonl/0"][0]["image_code_loss"]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert evaluate.main(args) == m  # resumed: every item already predicted
