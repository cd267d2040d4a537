"""Tokenizers: the deterministic shapes sentencepiece model, the Janus chat layouts, HF loading."""

import os
import pickle
import sys
import types

import hf_models
import numpy as np
import pytest

from unijax.data import tokenizer as T
from unijax.models.family import preset

try:
    from unijax.data import shapes
except ImportError:  # not written yet: the tests run on an inline corpus instead
    shapes = None

# A stand-in world in the style of `shapes.corpus()` (used only when that module is missing).
INLINE_CORPUS = [
    "a red circle", "a blue square and two green triangles", "a purple triangle, a yellow circle and a blue circle",
    "what colour is the triangle?", "how many circles are there?", "is there a cyan circle in the image?",
    "is the purple square to the left of the blue circle?", "where is the blue circle relative to the red square?",
    "what colour is the triangle?\na. purple\nb. green\nc. cyan\nd. yellow\nanswer with the letter.",
    "red", "blue", "green", "yellow", "purple", "cyan", "circle", "square", "triangle", "yes", "no",
    "zero", "one", "two", "three", "left", "right", "above", "below", "a", "b", "c", "d",
]


def _corpus():
    return sorted(set(shapes.corpus())) if shapes is not None else INLINE_CORPUS


@pytest.fixture(autouse=True)
def _shapes_module(monkeypatch):
    """Installs the inline corpus as `unijax.data.shapes` when the real module does not exist."""
    if shapes is None:
        fake = types.ModuleType("unijax.data.shapes")
        fake.corpus = lambda: list(INLINE_CORPUS)
        monkeypatch.setitem(sys.modules, "unijax.data.shapes", fake)
        import unijax.data

        monkeypatch.setattr(unijax.data, "shapes", fake, raising=False)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes_tok")


@pytest.fixture
def tok(shapes_dir):
    return T.shapes_tokenizer(shapes_dir)


def _pieces(tok, ids):
    return [tok._sp.id_to_piece(int(i)) for i in ids]


# -- shapes tokenizer --------------------------------------------------------------------------

def test_shapes_model_is_deterministic(tmp_path):
    a = T.shapes_tokenizer(tmp_path / "a")
    b = T.shapes_tokenizer(tmp_path / "b")
    bytes_a = (tmp_path / "a" / T.SHAPES_MODEL_FILE).read_bytes()
    assert bytes_a == (tmp_path / "b" / T.SHAPES_MODEL_FILE).read_bytes()
    assert a.vocab_size == b.vocab_size
    assert not [p for p in os.listdir(tmp_path / "a") if p != T.SHAPES_MODEL_FILE]  # no temp files left


def test_shapes_special_ids_fit_the_tiny_preset(tok):
    assert tok.special_ids == {"pad": 0, "bos": 1, "eos": 2, "image": 3, "boi": 4, "eoi": 5}
    sp = tok._sp
    assert [sp.id_to_piece(i) for i in range(6)] == ["<pad>", "<s>", "</s>", *T.SHAPES_CONTROL]
    assert sp.unk_id() == T.SHAPES_UNK_ID
    for s in ("<|User|>", "<|Assistant|>", "\n"):
        assert tok.encode(s) == [sp.piece_to_id(s)]  # single pieces
    cfg = preset("tiny")
    T.check_compatible(tok, cfg)
    assert tok.vocab_size <= cfg.text.vocab_size
    print(f"shapes tokenizer: {tok.vocab_size} pieces")


def test_shapes_round_trip_and_length(tok):
    corpus = _corpus()
    for s in corpus:
        assert tok.decode(tok.encode(s)) == s, s
        assert tok.decode(tok.encode(" " + s)) == " " + s, s
    questions = [s for s in corpus if "?" in s]
    lengths = {s: len(tok.encode(s)) for s in questions}
    longest = max(questions, key=lengths.get)
    words = sum(len(s.split()) for s in corpus)
    pieces = sum(len(tok.encode(s)) for s in corpus)
    print(f"{len(corpus)} corpus strings; {pieces / words:.3f} pieces per word; "
          f"{np.mean(list(lengths.values())):.2f} tokens per question on average; "
          f"longest question {lengths[longest]} tokens: {longest!r}")
    assert lengths[longest] < 25
    assert pieces / words < 1.5
    # text the world never produces still round-trips (byte fallback)
    for s in ("Draw a RED star, please!", "größe ✓", "  two  spaces\tand a tab\n"):
        assert tok.decode(tok.encode(s)) == s


def test_shapes_cache_reused_and_rebuilt(tmp_path):
    T.shapes_tokenizer(tmp_path)
    path = tmp_path / T.SHAPES_MODEL_FILE
    data = path.read_bytes()
    os.utime(path, (1_000_000_000, 1_000_000_000))
    T.shapes_tokenizer(tmp_path)
    assert path.stat().st_mtime == 1_000_000_000  # reused, not rewritten
    path.unlink()
    tok = T.shapes_tokenizer(tmp_path)
    assert path.read_bytes() == data and tok.bos_id == 1


def test_shapes_cache_with_other_special_ids_is_an_error(tmp_path):
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a red circle", "a blue star"]), model_writer=buf,
                                   model_type="bpe", vocab_size=40, hard_vocab_limit=False, minloglevel=2,
                                   num_threads=1)
    (tmp_path / T.SHAPES_MODEL_FILE).write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="shapes_sp_v2.model.*Delete"):
        T.shapes_tokenizer(tmp_path)
    (tmp_path / T.SHAPES_MODEL_FILE).write_bytes(b"not a model")
    with pytest.raises(ValueError, match="cannot load sentencepiece model .*shapes_sp_v2.model"):
        T.shapes_tokenizer(tmp_path)


def test_shapes_tokenizer_pickles(tok):
    back = pickle.loads(pickle.dumps(tok))
    s = "a red circle"
    assert back.encode(s) == tok.encode(s) and back.special_ids == tok.special_ids


def test_decode_skips_special_and_out_of_range_ids(tok):
    ids = tok.encode("red")
    assert tok.decode([tok.bos_id, tok.boi_id, tok.image_id, *ids, tok.eoi_id, tok.eos_id, tok.pad_id,
                       tok.vocab_size + 3]) == "red"
    assert tok.decode(np.asarray([tok.bos_id, *ids], np.int32)) == "red"


# -- chat layouts ------------------------------------------------------------------------------

def test_mmu_layout(tok):
    n = 7
    turns = [("what colour is the triangle?", "red"), ("how many circles are there?", "two")]
    ids, is_image, is_answer = tok.mmu_ids(turns, n)
    assert ids.dtype == np.int32 and is_image.dtype == bool and is_answer.dtype == bool
    assert ids.shape == is_image.shape == is_answer.shape
    assert ids[0] == tok.bos_id
    # image span: boi + n image ids + eoi, once
    (boi,) = np.flatnonzero(ids == tok.boi_id)
    assert list(ids[boi:boi + n + 2]) == [tok.boi_id] + [tok.image_id] * n + [tok.eoi_id]
    assert np.array_equal(np.flatnonzero(is_image), np.arange(boi + 1, boi + 1 + n))
    assert np.array_equal(is_image, ids == tok.image_id)
    # answers: exactly " red" + eos and " two" + eos
    want = np.zeros(len(ids), bool)
    eos = np.flatnonzero(ids == tok.eos_id)
    assert len(eos) == 2 and eos[-1] == len(ids) - 1
    for (_, a), e in zip(turns, eos):
        k = len(tok.encode(" " + a))
        want[e - k:e + 1] = True
        assert tok.decode(ids[e - k:e]) == " " + a
    assert np.array_equal(is_answer, want)
    # the text parts decode to the Janus chat string
    text = tok.decode(ids[:boi]) + tok.decode(ids[boi + n + 2:eos[0] + 1]) + tok.decode(ids[eos[0] + 1:])
    assert text == ("<|User|>: \nwhat colour is the triangle?\n\n<|Assistant|>: red"
                    "<|User|>: how many circles are there?\n\n<|Assistant|>: two")
    print("mmu layout:", _pieces(tok, ids))


def test_mmu_generation_prompt_and_system_prompt(tok):
    ids, is_image, is_answer = tok.mmu_ids([("what colour is the triangle?", None)], 4)
    assert not is_answer.any() and is_image.sum() == 4
    assert tok.decode(ids) == "<|User|>: \nwhat colour is the triangle?\n\n<|Assistant|>:"
    assert list(ids[-2:]) == tok.encode("<|Assistant|>:")
    with pytest.raises(ValueError, match="only the last turn"):
        tok.mmu_ids([("what?", None), ("what?", "red")], 4)
    ids, _, _ = tok.mmu_ids([("what colour is the triangle?", "red")], 2, system_prompt="answer briefly.\n\n")
    assert tok.decode(ids) == "answer briefly.\n\n<|User|>: \nwhat colour is the triangle?\n\n<|Assistant|>: red"
    ids, is_image, _ = tok.mmu_ids([("what colour is the triangle?", "red")], 0)  # text only
    assert not is_image.any() and tok.boi_id not in ids
    assert tok.decode(ids) == "<|User|>: what colour is the triangle?\n\n<|Assistant|>: red"


def test_mmu_one_image_goes_where_its_mark_is(tok):
    """A single image whose question holds an `<image>` mark is placed at the mark (as Janus's
    processor replaces `<image_placeholder>`), not encoded as text; without a mark it goes first."""
    from unijax.contract import IMAGE_MARKER

    ids, is_image, _ = tok.mmu_ids([(f"what colour is the triangle?\n{IMAGE_MARKER}", "red")], 3)
    (boi,) = np.flatnonzero(ids == tok.boi_id)
    assert is_image.sum() == 3 and tok.decode(ids[:boi]) == "<|User|>: what colour is the triangle?\n"
    assert tok.decode(ids[boi:]) == "\n\n<|Assistant|>: red"
    with pytest.raises(ValueError, match="2 '<image>' marks"):
        tok.mmu_ids([(f"{IMAGE_MARKER} or {IMAGE_MARKER}?", "red")], 3)


def test_t2i_layout(tok):
    prompt = "a blue square and two green triangles"
    ids = tok.t2i_ids(prompt)
    assert ids.dtype == np.int32
    assert ids[0] == tok.bos_id and ids[-1] == tok.boi_id
    assert tok.boi_id not in ids[:-1] and tok.image_id not in ids
    assert tok.decode(ids) == f"<|User|>: {prompt}\n\n<|Assistant|>:"
    print("t2i layout:", _pieces(tok, ids))


# -- transformers tokenizers -------------------------------------------------------------------

def _save_hf_tokenizer(path, *, roles=T.ROLES):
    """A tiny byte-level BPE tokenizer with the Janus special tokens of `roles`, saved locally."""
    return hf_models.save_janus_tokenizer(path, INLINE_CORPUS, roles=roles)


def test_hf_tokenizer(tmp_path):
    d = _save_hf_tokenizer(tmp_path / "hf")
    tok = T.load_tokenizer(str(d), data_dir=str(tmp_path / "unused"))
    assert isinstance(tok, T.HFTokenizer)
    hf = tok.hf
    for role, s in T.JANUS_SPECIAL_TOKENS.items():
        assert tok.special_ids[role] == hf.convert_tokens_to_ids(s)
    assert tok.vocab_size == len(hf)
    for s in INLINE_CORPUS + ["Hello, World!\n\n  x"]:
        assert tok.decode(tok.encode(s)) == s
    # the MMU layout equals the tokenized Janus processor string (system prompt, image expanded)
    n = 5
    turns = [("what colour is the triangle?", "red"), ("how many circles are there?", "two")]
    ids, is_image, is_answer = tok.mmu_ids(turns, n)
    image = "<begin_of_image>" + "<image_placeholder>" * n + "<end_of_image>"
    text = (T.JANUS_SYSTEM_PROMPT + f"<|User|>: {image}\nwhat colour is the triangle?\n\n<|Assistant|>: red"
            "<｜end▁of▁sentence｜><|User|>: how many circles are there?\n\n<|Assistant|>: two"
            "<｜end▁of▁sentence｜>")
    assert list(ids) == [tok.bos_id] + hf.encode(text, add_special_tokens=False)
    assert is_image.sum() == n and is_answer.sum() == len(tok.encode(" red")) + len(tok.encode(" two")) + 2
    ids = tok.t2i_ids("a blue square")
    assert list(ids) == [tok.bos_id] + hf.encode("<|User|>: a blue square\n\n<|Assistant|>:<begin_of_image>",
                                                 add_special_tokens=False)
    pickle.loads(pickle.dumps(tok))
    with pytest.raises(ValueError, match="pad_id=.*model.text.pad_token_id=0"):
        T.check_compatible(tok, preset("tiny"))


def test_system_prompt_matches_transformers():
    from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

    assert T.JANUS_SYSTEM_PROMPT == DEFAULT_SYSTEM_PROMPT


def test_hf_tokenizer_missing_token_names_it(tmp_path):
    d = _save_hf_tokenizer(tmp_path / "hf", roles=("pad", "bos", "eos", "image", "eoi"))
    with pytest.raises(ValueError, match=r"hf.*<begin_of_image>"):
        T.hf_tokenizer(d)
    with pytest.raises(ValueError, match=r"data\.tokenizer=.*<begin_of_image>"):
        T.load_tokenizer(str(d), str(tmp_path))


def test_load_tokenizer_errors_name_the_config_key(tmp_path):
    with pytest.raises(ValueError, match=r"data\.tokenizer='/nonexistent/tok'"):
        T.load_tokenizer("/nonexistent/tok", str(tmp_path))
    with pytest.raises(ValueError, match=r"data\.tokenizer"):
        T.load_tokenizer(str(tmp_path), str(tmp_path))  # a directory without a tokenizer
    assert T.load_tokenizer("shapes", str(tmp_path)).bos_id == 1
