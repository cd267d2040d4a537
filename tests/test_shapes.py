"""The shapes world (`unijax.data.shapes`) and its detector / GenEval scorer (`shapes.detector`, `shapes.scoring`)."""

import collections
import itertools
import re
import subprocess
import sys

import numpy as np
import pytest

from unijax.data import shapes as G  # the detector / GenEval scorer, re-exported by the package
from unijax.data import shapes as S


def _blur3(image):
    """3x3 box blur with edge padding, float32."""
    padded = np.pad(image.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    return sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9


def _rates(size, n, perturb=None, seed=0):
    """(match_scene rate, geneval overall on true prompts) over scenes scene_at(seed, 0..n-1)."""
    rng = np.random.default_rng(1)
    matched, specs, images = 0, [], []
    for i in range(n):
        scene = S.scene_at(seed, i, size)
        image = S.render(scene)
        if perturb is not None:
            image = perturb(image, rng)
        matched += G.match_scene(scene, G.detect(image))
        specs.append(S.t2i_prompt(scene, rng)[1])
        images.append(image)
    return matched / n, G.geneval(specs, images)["overall"]


def _words(texts):
    return {w for t in texts for w in t.split()}


# -- scenes and rendering -------------------------------------------------------------------------

def test_scene_at_is_deterministic_and_render_bit_exact():
    assert S.scene_at(0, 5) == S.scene_at(0, 5)
    assert len({S.scene_at(0, i) for i in range(20)}) == 20
    assert S.scene_at(0, 5) != S.scene_at(1, 5)
    assert S.scene_at(0, 5) == S.sample_scene(np.random.default_rng([0, 5]), 32)
    a, b = S.render(S.scene_at(0, 3)), S.render(S.scene_at(0, 3))
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("size,n", [(32, 300), (64, 100), (128, 50), (384, 20)])
def test_scenes_fit_and_do_not_overlap(size, n):
    lo, hi = S.object_size_range(size)
    gap = S.object_gap(size)
    counts = collections.Counter()
    for i in range(n):
        scene = S.scene_at(7, i, size)
        assert scene.size == size and 1 <= len(scene.objects) <= 3
        counts[len(scene.objects)] += 1
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            assert lo <= x1 - x0 <= hi and x1 - x0 == y1 - y0
        for a, b in itertools.combinations(scene.objects, 2):
            ax0, ay0, ax1, ay1 = a.box
            bx0, by0, bx1, by1 = b.box
            assert ax0 >= bx1 + gap or bx0 >= ax1 + gap or ay0 >= by1 + gap or by0 >= ay1 + gap
        image = S.render(scene)
        assert image.shape == (size, size, 3)
        assert (image.reshape(-1, 3) != 0).any(1).sum() > 0
    assert set(counts) == {1, 2, 3}
    if size == 32:
        assert 9 <= lo and hi <= 13


def test_counting_scenes_occur():
    repeated = sum(len({(o.shape, o.colour) for o in S.scene_at(0, i).objects}) < len(S.scene_at(0, i).objects)
                   for i in range(300))
    assert 30 < repeated < 150


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="size"):
        S.sample_scene(np.random.default_rng(0), size=8)
    with pytest.raises(ValueError, match="max_objects"):
        S.sample_scene(np.random.default_rng(0), max_objects=5)
    with pytest.raises(ValueError, match="shape"):
        S.Obj("hexagon", "red", (0, 0, 4, 4))
    with pytest.raises(ValueError, match="colour"):
        S.Obj("circle", "pink", (0, 0, 4, 4))
    with pytest.raises(ValueError, match="kinds"):
        S.sample_question(S.scene_at(0, 0), np.random.default_rng(0), kinds=["nonsense"])
    with pytest.raises(ValueError, match="image"):
        G.detect(np.zeros((8, 8), np.uint8))


def test_shapes_module_needs_no_jax():
    code = "import sys, unijax.data.shapes; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- detector -------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,n", [(32, 400), (64, 60), (128, 20), (384, 4)])
def test_detector_on_clean_renders(size, n):
    match, overall = _rates(size, n)
    print(f"size {size}: match_scene {match:.3f}, geneval overall {overall:.3f} over {n} scenes")
    assert match >= 0.98 and overall >= 0.98  # measured 1.000 / 1.000 at every size


def test_detector_under_noise_and_blur():
    def perturb(image, rng):
        return np.clip(_blur3(image) + rng.normal(0, 10, image.shape), 0, 255).round().astype(np.uint8)

    match, overall = _rates(32, 300, perturb, seed=3)
    print(f"32 px, 3x3 blur + noise sigma 10: match_scene {match:.3f}, geneval overall {overall:.3f}")
    # measured 1.000 / 1.000; with sigma 20 ~0.99; JPEG q50 ~0.998; 2x down-up-sampled 1.000
    assert match >= 0.9 and overall >= 0.9


def test_detector_boxes_exact_on_clean_render():
    for size in (384, 32):  # (speed, ~2 ms at 32 px and ~0.2 s at 384 px here, is not a unit test's business)
        scene = S.scene_at(0, 11, size)
        detections = G.detect(S.render(scene))
        assert sorted(d.box for d in detections) == sorted(o.box for o in scene.objects), size


def test_detector_ignores_background_and_noise_specks():
    assert G.detect(np.zeros((32, 32, 3), np.uint8)) == []
    image = np.zeros((32, 32, 3), np.uint8)
    image[5, 5] = S.COLOURS["red"]  # one pixel: below the 1 % area floor
    image[20:22, 20:22] = (128, 128, 128)  # grey: no palette colour
    assert G.detect(image) == []


# -- a hand-written scene --------------------------------------------------------------------------

RED_CIRCLE = S.Obj("circle", "red", (2, 10, 13, 21))
BLUE_SQUARE = S.Obj("square", "blue", (19, 10, 30, 21))
SCENE = S.Scene((RED_CIRCLE, BLUE_SQUARE), 32)
SWAPPED = S.Scene((S.Obj("circle", "red", BLUE_SQUARE.box), S.Obj("square", "blue", RED_CIRCLE.box)), 32)


def test_relations():
    assert S.relations(RED_CIRCLE.box, BLUE_SQUARE.box) == {"left of"}
    assert S.relations(BLUE_SQUARE.box, RED_CIRCLE.box) == {"right of"}
    assert S.relations((0, 0, 10, 10), (0, 20, 10, 30)) == {"above"}
    assert S.relations((0, 0, 10, 10), (20, 20, 30, 30)) == {"left of", "above"}
    assert S.relations((0, 0, 10, 10), (1, 1, 11, 11)) == set()  # within the margin


def test_hand_written_scene_questions():
    expected = {
        "exist_positive": {"is there a red circle in the image?": "yes", "is there a blue square in the image?": "yes"},
        "colour": {"what colour is the circle?": "red", "what colour is the square?": "blue"},
        "shape": {"what shape is the red object?": "circle", "what shape is the blue object?": "square"},
        "count": {"how many circles are there?": "one", "how many squares are there?": "one",
                  "how many triangles are there?": "zero"},
        "position": {
            "where is the red circle relative to the blue square?": "left",
            "where is the blue square relative to the red circle?": "right",
            "is the red circle to the left of the blue square?": "yes",
            "is the red circle to the right of the blue square?": "no",
            "is the blue square to the right of the red circle?": "yes",
            "is the blue square to the left of the red circle?": "no",
        },
        "caption": {S.CAPTION_QUESTION: "a red circle and a blue square"},
    }
    seen = collections.defaultdict(set)
    truth = {"circle": "red", "square": "blue", "triangle": None}
    counts = {"circle": "one", "square": "one", "triangle": "zero"}
    for seed in range(200):
        rng = np.random.default_rng(seed)
        for qa in S.questions(SCENE, rng):
            if qa.kind in expected:
                assert expected[qa.kind].get(qa.question) == qa.answer, qa
                seen[qa.kind].add(qa.question)
            elif qa.kind.startswith("exist_"):
                shape, colour = re.fullmatch(r"is there a (\w+) (\w+) in the image\?", qa.question).group(2, 1)
                assert qa.answer == "no" and truth[shape] != colour
            else:
                assert qa.kind == "choice"
                stem, *options, suffix = qa.question.split("\n")
                assert suffix == "answer with the letter." and [o[:3] for o in options] == ["a. ", "b. ", "c. ", "d. "]
                chosen = options["abcd".index(qa.answer)][3:]
                if stem.startswith("what colour is the "):
                    assert chosen == truth[stem[len("what colour is the "):-1]]
                else:
                    assert chosen == counts[re.fullmatch(r"how many (\w+)s are there\?", stem).group(1)]
                assert len(set(options)) == 4
    for kind, table in expected.items():
        assert seen[kind] == set(table), kind


def test_hand_written_scene_prompts_and_scoring():
    prompts = {}
    for seed in range(100):
        text, spec = S.t2i_prompt(SCENE, np.random.default_rng(seed))
        prompts[text] = spec
    assert set(prompts) == {
        "a circle and a square", "a square and a circle",
        "a red circle and a blue square", "a blue square and a red circle",
        "a red circle to the left of a blue square", "a blue square to the right of a red circle",
    }
    spec = prompts["a red circle to the left of a blue square"]
    assert spec == S.PromptSpec("position", (("circle", "red", 1), ("square", "blue", 1)), position=("left of", 0, 1))
    detections = G.detect(S.render(SCENE))
    assert G.match_scene(SCENE, detections)
    assert all(G.score(s, detections) for s in prompts.values())
    swapped = G.detect(S.render(SWAPPED))
    assert not G.score(spec, swapped)  # position prompt vs swapped positions
    assert G.score(prompts["a red circle and a blue square"], swapped)
    assert not G.match_scene(SCENE, swapped)


def test_score_rejects_wrong_images():
    blue_square = G.detect(S.render(S.Scene((S.Obj("square", "blue", (10, 10, 21, 21)),), 32)))
    red_square = G.detect(S.render(S.Scene((S.Obj("square", "red", (10, 10, 21, 21)),), 32)))
    a_red_circle = S.PromptSpec("colors", (("circle", "red", 1),))
    assert not G.score(a_red_circle, blue_square) and not G.score(a_red_circle, red_square)
    assert G.score(S.PromptSpec("single_object", (("square", None, 1),)), blue_square)

    def circles(n):
        boxes = [(1, 1, 11, 11), (20, 1, 30, 11), (1, 20, 11, 30)][:n]
        scene = S.Scene(tuple(S.Obj("circle", "red", b) for b in boxes), 32)
        return G.detect(S.render(scene))

    two = S.PromptSpec("counting", (("circle", "red", 2),), (("circle", "red", 3),))
    assert [G.score(two, circles(n)) for n in (1, 2, 3)] == [False, True, False]
    extra = list(G.detect(S.render(SCENE))) + [G.Detection("triangle", "green", (10, 25, 16, 31))]
    assert not G.match_scene(SCENE, extra)


def test_geneval_report():
    specs = [S.PromptSpec("colors", (("circle", "red", 1),)), S.PromptSpec("colors", (("square", "red", 1),)),
             S.PromptSpec("two_object", (("circle", None, 1), ("square", None, 1)))]
    image = S.render(SCENE)
    report = G.geneval(specs, [image] * 3)
    assert report["colors"] == 0.5 and report["two_object"] == 1.0 and report["overall"] == 0.75
    assert report["counts"] == {"two_object": 1, "colors": 2} and report["correct"] == [True, False, True]
    with pytest.raises(ValueError, match="images"):
        G.geneval(specs, [image])


def test_prompt_set_is_balanced_and_true():
    items = S.prompt_set(0, per_tag=10)
    assert collections.Counter(spec.tag for _, spec, _ in items) == dict.fromkeys(S.TAGS, 10)
    assert items == S.prompt_set(0, per_tag=10)
    assert all(G.score(spec, G.detect(S.render(scene))) for _, spec, scene in items)


# -- POPE-style questions ---------------------------------------------------------------------------

def test_sample_question_balance_and_negatives():
    rng = np.random.default_rng(0)
    answers, letters, kinds = collections.Counter(), collections.Counter(), collections.Counter()
    for i in range(3000):
        scene = S.scene_at(11, i)
        qa = S.sample_question(scene, rng)
        kinds[qa.kind] += 1
        if qa.answer in ("yes", "no"):
            answers[qa.answer] += 1
        letters[S.sample_question(scene, rng, kinds=["choice"]).answer] += 1
        present = {(o.shape, o.colour) for o in scene.objects}
        for kind in S.EXIST_NEGATIVE_KINDS:
            neg = S.make_question(scene, kind, rng)
            colour, shape = re.fullmatch(r"is there a (\w+) (\w+) in the image\?", neg.question).groups()
            assert neg.answer == "no" and (shape, colour) not in present
            if kind == "exist_popular":
                assert (shape, colour) in S.POPULAR
            if kind == "exist_adversarial":
                assert any(shape == s or colour == c for s, c in present)
    yes = answers["yes"] / sum(answers.values())
    print(f"yes rate {yes:.3f} over {sum(answers.values())} yes/no questions; letters {dict(letters)}; "
          f"kinds {dict(kinds)}")
    assert 0.4 <= yes <= 0.6
    assert set(letters) == set(S.LETTERS) and all(0.2 <= n / 3000 <= 0.3 for n in letters.values())
    assert set(kinds) == set(S.KINDS)


def _drawn_and_expected(scene_seed: int, weights: dict, key, shares, kinds=None, n: int = 4000):
    """Draws one question per scene `scene_at(scene_seed, i)`, i < n, counting `key(qa)`, and sums each
    scene's expected shares (`shares(scene)`: {key: probability}, float64); checks every key's drawn
    share against the expectation within 4 standard errors. Returns the drawn counts."""
    rng = np.random.default_rng(scene_seed)
    drawn, expected = collections.Counter(), collections.Counter()
    for i in range(n):
        scene = S.scene_at(scene_seed, i)
        drawn[key(S.sample_question(scene, rng, kinds, weights=weights))] += 1
        for k, p in shares(scene).items():
            expected[k] += p
    for k in expected:
        p = expected[k] / n
        assert abs(drawn[k] / n - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-12, (k, drawn[k] / n, p)
    return drawn, expected


def test_question_weights_set_the_family_mix():
    """`data.question_weights`: each family is drawn in proportion to its weight among the families
    the scene admits (float64 expectation over the same scenes; 4,000 draws, 4 standard errors)."""
    weights = S.parse_weights("exist=4, choice=2,caption=0")
    assert weights == {"exist": 4.0, "choice": 2.0, "caption": 0.0}

    def shares(scene):
        fams = [f for f in S.FAMILIES if any(S.admits(scene, [k]) for k in S.KINDS
                                              if k == f or (f == "exist" and k.startswith("exist_")))]
        w = np.array([weights.get(f, 1.0) for f in fams], dtype=np.float64)
        return dict(zip(fams, w / w.sum()))

    drawn, expected = _drawn_and_expected(12, weights, lambda qa: "exist" if qa.kind.startswith("exist_") else qa.kind,
                                          shares)
    assert drawn["caption"] == 0 and "caption" in expected and set(expected) == set(S.FAMILIES)
    assert drawn["exist"] > 3 * drawn["colour"]
    # no weights: the uniform draw, the same questions as before the option existed
    a = [S.sample_question(S.scene_at(12, i), np.random.default_rng(i)) for i in range(50)]
    b = [S.sample_question(S.scene_at(12, i), np.random.default_rng(i), weights={}) for i in range(50)]
    assert a == b
    for bad in ("exist", "exists=2", "exist=-1", "choice=x"):
        with pytest.raises(ValueError, match="data.question_weights"):
            S.parse_weights(bad)


def test_question_weights_set_the_negative_existence_mix():
    """`exist_<negative kind>=w` in `data.question_weights`: the negatives of the kinds a scene admits
    are drawn in proportion to their weights (float64 expectation over the same scenes; 4 standard
    errors), the positives stay half of existence, and weights of 1 leave the draw unchanged."""
    weights = S.parse_weights("exist=50,exist_adversarial=4,exist_random=0")
    assert weights == {"exist": 50.0, "exist_adversarial": 4.0, "exist_random": 0.0}

    def shares(scene):
        negs = [k for k in S.EXIST_NEGATIVE_KINDS if S.admits(scene, [k])]
        w = np.array([weights.get(k, 1.0) for k in negs], dtype=np.float64)
        return {"exist_positive": 0.5, **dict(zip(negs, 0.5 * w / w.sum()))}

    drawn, _ = _drawn_and_expected(13, weights, lambda qa: qa.kind, shares, kinds=S.KINDS[:4])
    assert drawn["exist_random"] == 0 and drawn["exist_adversarial"] > 3 * drawn["exist_popular"]
    a = [S.sample_question(S.scene_at(13, i), np.random.default_rng(i), weights={"colour": 1.0}) for i in range(50)]
    b = [S.sample_question(S.scene_at(13, i), np.random.default_rng(i),
                           weights={"colour": 1.0, "exist_adversarial": 1.0}) for i in range(50)]
    assert a == b
    with pytest.raises(ValueError, match="data.question_weights"):
        S.parse_weights("exist_positive=2")


def test_answer_is_yes():
    assert S.answer_is_yes("yes") and S.answer_is_yes("Yes, there is a red circle.")
    assert not S.answer_is_yes("no") and not S.answer_is_yes("No.")
    assert not S.answer_is_yes("there is not a red circle in the image.")
    assert S.answer_is_yes("yes. there is no blue square.")  # only the first sentence counts


def test_text_is_lowercase_and_tidy():
    rng = np.random.default_rng(5)
    for i in range(300):
        scene = S.scene_at(5, i)
        texts = [S.t2i_prompt(scene, rng)[0]] + [t for qa in S.questions(scene, rng) for t in (qa.question, qa.answer)]
        for t in texts:
            assert t == t.lower() and t == t.strip() and "  " not in t
            assert all(line == line.strip() for line in t.split("\n"))


# -- corpus ----------------------------------------------------------------------------------------

def test_corpus_covers_fresh_samples_and_stays_small():
    S._corpus.cache_clear()
    corpus = S.corpus()
    # its size, not a wall time, bounds the cost (57k strings: about 1 s here; a timed assertion failed
    # at 4.1 s on a machine busy with a training run)
    assert len(corpus) < 80_000, len(corpus)
    assert corpus == S.corpus() and all(isinstance(t, str) for t in corpus)
    rng = np.random.default_rng(12345)
    fresh = []
    for _ in range(500):
        scene = S.sample_scene(rng, size=int(rng.choice([32, 64])))
        qa = S.sample_question(scene, rng)
        fresh += [S.t2i_prompt(scene, rng)[0], qa.question, qa.answer]
    missing = _words(fresh) - _words(corpus)
    assert not missing
    assert set("".join(fresh)) <= set("".join(corpus))


def test_blind_baseline():
    """The image-blind answerer: always right where the text gives the answer away, near the colour
    prior where it does not, deterministic."""
    assert S.blind_baseline(("exist_positive",), fit=200, held_out=200)["accuracy"] == 1.0
    colour = S.blind_baseline(("colour",), fit=2000, held_out=1000)["accuracy"]
    assert 0.12 < colour < 0.35, colour  # the most frequent colour (22%), not 1/6 and not the image
    both = S.blind_baseline(("exist_positive", "colour"), fit=2000, held_out=1000)
    assert both["accuracy_exist_positive"] == 1.0 and both["accuracy_colour"] < 0.35
    assert both == S.blind_baseline(("exist_positive", "colour"), fit=2000, held_out=1000)
