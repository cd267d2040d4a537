"""The online DPO loop's judge and pairing (`unijax.analysis.online_dpo`), with a stand-in engine whose
samples are known: renders of the prompt's own scene pass, other scenes do not."""

import json

import numpy as np

from configs import dpo
from unijax.analysis import online_dpo
from unijax.data import preference, records, shapes
from unijax.training.config import model_config


class FakeEngine:
    """Sample j of prompt i is the prompt's true scene when j is even, another scene otherwise;
    answer k to a question is right when k is even."""

    image_size = 32

    def __init__(self, seed):
        self.items = shapes.prompt_set(seed, 1, 32)

    def images(self, prompts, *, num_images, guidance, sampling, seed):
        rng = np.random.default_rng(0)
        out = np.zeros((len(prompts), num_images, 32, 32, 3), np.uint8)
        for i, _ in enumerate(prompts):
            for j in range(num_images):
                out[i, j] = shapes.render(self.items[i][2] if j % 2 == 0 else shapes.sample_scene(rng, 32))
        return out

    def answer(self, images, questions, *, sampling, seed):
        right = (seed % 100) % 2 == 0
        return [self.truth[q] if right else "purple" for q in questions]


def test_partial_score_is_one_exactly_when_geneval_passes():
    rng = np.random.default_rng(1)
    items = shapes.prompt_set(5, 4, 32)
    checked = 0
    for _, spec, scene in items:
        for image in (shapes.render(scene), shapes.render(shapes.sample_scene(rng, 32))):
            dets = shapes.detect(image)
            s = shapes.partial_score(spec, dets)
            assert 0.0 <= s <= 1.0 and (s == 1.0) == shapes.score(spec, dets)
            checked += 1
    assert checked == 2 * len(items)


def test_pairs_are_best_against_worst_and_read_back_as_preference_records(tmp_path):
    seed = online_dpo.TRAIN_SEED
    engine = FakeEngine(seed)
    gen, passed = online_dpo.generation_pairs(engine, tmp_path, seed=seed, prompts=6, samples=2, cfg=5.0)
    truths = [shapes.score(spec, shapes.detect(shapes.render(scene))) for _, spec, scene in engine.items]
    assert passed == sum(truths) / (2 * len(truths))
    assert 0 < len(gen) <= 6
    rng = np.random.default_rng([seed, 3])
    scenes = [shapes.sample_scene(rng, 32) for _ in range(5)]
    qas = [shapes.sample_question(s, rng) for s in scenes]
    engine.truth = {qa.question: qa.answer for qa in qas}
    und, right = online_dpo.understanding_pairs(engine, tmp_path, seed=seed, questions=5, samples=2)
    assert right == 0.5 and [r["better_response"] for r in und] == [qa.answer for qa in qas]
    assert all(r["worse_response"] == "purple" for r in und)
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in gen + und))
    src = preference.PreferenceJsonl(str(f), str(tmp_path))
    pairs = [src[i] for i in range(len(src))]
    assert [p["task"] for p in pairs] == ["t2i"] * len(gen) + ["mmu"] * len(und)
    for pair in pairs[:len(gen)]:  # the chosen image scores higher than the rejected one
        prompt = pair["chosen"]["caption"]
        spec = next(s for p, s, _ in engine.items if p == prompt)
        assert (shapes.partial_score(spec, shapes.detect(pair["chosen"]["image"])) >
                shapes.partial_score(spec, shapes.detect(pair["rejected"]["image"])))


def test_truth_chosen_pairs_the_data_with_the_worst_sample(tmp_path):
    seed = online_dpo.TRAIN_SEED
    engine = FakeEngine(seed)
    engine.images = lambda prompts, **kw: np.zeros((len(prompts), kw["num_images"], 32, 32, 3), np.uint8)
    assert online_dpo.generation_pairs(engine, tmp_path, seed=seed, prompts=6, samples=2, cfg=5.0)[0] == []
    gen, passed = online_dpo.generation_pairs(engine, tmp_path, seed=seed, prompts=6, samples=2, cfg=5.0,
                                              truth_chosen=True)
    assert passed == 0 and len(gen) == 6


def test_round_config_trains_the_round_pairs_from_the_round_start(tmp_path):
    start = tmp_path / "start"
    start.mkdir()
    (start / "model.json").write_text(json.dumps(model_config(dpo.get_config()).to_dict()))  # what validate reads
    c = online_dpo.round_config(dpo.get_config(), str(start), str(tmp_path / "pairs.jsonl"), str(tmp_path), str(tmp_path / "w"),
                     12, "gen", guidance=5.0)
    assert c.init_from == str(start) and c.init_recipe == "" and c.model.preset == "checkpoint"
    assert c.data.source == "files" and c.data.pref_jsonl.endswith("pairs.jsonl") and c.train.steps == 12
    assert (c.data.und_ratio, c.data.gen_ratio) == (0.0, 1.0) and c.train.objective == "dpo"
    assert c.dpo.guidance == 5.0  # the codes are scored under the CFG they were sampled with


def test_several_pairs_per_prompt_rank_the_samples(tmp_path):
    """With 4 samples (2 true renders, 2 other scenes) and `per_prompt=2`, a prompt whose renders pass
    gives two pairs, each a passing render against a failing scene; never the same image twice."""
    seed = online_dpo.TRAIN_SEED
    engine = FakeEngine(seed)
    gen, _ = online_dpo.generation_pairs(engine, tmp_path, seed=seed, prompts=6, samples=4, cfg=5.0, per_prompt=2)
    (tmp_path / "one").mkdir()
    one, _ = online_dpo.generation_pairs(engine, tmp_path / "one", seed=seed, prompts=6, samples=4, cfg=5.0)
    assert len(one) < len(gen) <= 2 * len(one)
    by_prompt = {}
    for r in gen:
        by_prompt.setdefault(r["prompt"], []).append(r)
    assert any(len(v) == 2 for v in by_prompt.values())
    for prompt, recs in by_prompt.items():
        spec = next(s for p, s, _ in engine.items if p == prompt)
        names = [n for r in recs for n in (r["better_image"], r["worse_image"])]
        assert len(set(names)) == len(names)
        scores = {n: shapes.partial_score(spec, shapes.detect(records.decode_image((tmp_path / n).read_bytes())))
                  for n in names}
        assert all(scores[r["better_image"]] > scores[r["worse_image"]] for r in recs)
