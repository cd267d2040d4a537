"""The shapes world's tokenizer corpus: every kind of string the world produces.

- `corpus()`: every string the world can produce, for training the tokenizer.

Imports `world`, `prompts` and `qa`.
"""

from __future__ import annotations

import functools

import numpy as np

from unijax.data.shapes.prompts import NUMBER_WORDS, RELATION_PHRASE, phrase, t2i_prompt
from unijax.data.shapes.qa import (
    CAPTION_QUESTION,
    CHOICE_SUFFIX,
    LETTERS,
    RELATION_WORD,
    _choice,
    _exist_question,
    questions,
)
from unijax.data.shapes.world import COLOURS, IDENTITIES, RELATIONS, SHAPES, sample_scene

CORPUS_SEED = 20240601
CORPUS_SCENES = 3000


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    texts = list(SHAPES) + [s + "s" for s in SHAPES] + list(COLOURS) + list(NUMBER_WORDS) + ["yes", "no"]
    texts += [RELATION_WORD[r] for r in RELATIONS] + list(LETTERS) + [CHOICE_SUFFIX, "object", CAPTION_QUESTION]
    for shape, colour in IDENTITIES:  # every template with every filler
        texts += [phrase(shape, colour, n) for n in (1, 2, 3)] + [_exist_question(shape, colour)]
        texts += [f"what shape is the {colour} object?", f"what colour is the {shape}?"]
        texts += [f"is the {colour} {shape} {RELATION_PHRASE[r]} the {colour} {shape}?" for r in RELATIONS]
        texts.append(f"where is the {colour} {shape} relative to the {colour} {shape}?")
        texts.append(f"{phrase(shape, colour)}, {phrase(shape, colour)} and {phrase(shape, colour)}")
    for shape in SHAPES:
        texts += [phrase(shape, None, n) for n in (1, 2, 3)] + [f"how many {shape}s are there?"]
        texts.append(_choice(f"what colour is the {shape}?", list(COLOURS)[:4]))
        texts.append(_choice(f"how many {shape}s are there?", NUMBER_WORDS))
    texts += [f"{letter}. {option}" for letter in LETTERS for option in (*COLOURS, *NUMBER_WORDS)]
    rng = np.random.default_rng(CORPUS_SEED)
    for _ in range(CORPUS_SCENES):
        scene = sample_scene(rng)
        texts.append(t2i_prompt(scene, rng)[0])
        for qa in questions(scene, rng):
            texts += [qa.question, qa.answer]
    return tuple(texts)


def corpus() -> list[str]:
    """Every kind of string the world produces (word lists, every template with every filler, and the
    prompts, questions and answers of CORPUS_SCENES scenes sampled with CORPUS_SEED); deterministic."""
    return list(_corpus())
