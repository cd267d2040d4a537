"""A deterministic procedural "shapes world": scenes, renders, prompts, questions and a corpus.

It trains and evaluates a tiny unified (understanding + generation) model on CPU with no downloads.
Pure numpy + PIL. This package re-exports the public API of its modules, so `shapes.X` works for
every name below (`shapes.detect`, `shapes.score`, `shapes.geneval`, `shapes.match_scene` and
`shapes.Detection` are the detector's and GenEval scorer's).

Modules, each importing only those above it:
- `world`: palette, identity prior, `Obj` / `Scene`, geometry (`relations`), `sample_scene`,
  `scene_at`, `render`.
- `prompts`: GenEval-style text-to-image prompts (`PromptSpec`, TAGS, `t2i_prompt`, `prompt_set`) and
  `caption`.
- `qa`: understanding questions (`QA`, KINDS, `make_question`, `questions`, `sample_question`), POPE's
  `answer_is_yes` and the image-blind baseline.
- `detector`: `detect(image) -> [Detection]`, the objects of a render or a generated image.
- `scoring`: GenEval's rule (`score`), its graded share (`partial_score`), its per-tag aggregate
  (`geneval`) and `match_scene`.
- `corpus_text`: `corpus()`, every string the world produces, for training the tokenizer.
"""

from unijax.data.shapes.corpus_text import CORPUS_SCENES, CORPUS_SEED, _corpus, corpus  # noqa: F401 (_corpus: tests)
from unijax.data.shapes.detector import Detection, detect
from unijax.data.shapes.prompts import (
                                      NUMBER_WORDS,
                                      RELATION_PHRASE,
                                      TAG_WEIGHTS,
                                      TAGS,
                                      PromptSpec,
                                      caption,
                                      join_phrases,
                                      phrase,
                                      prompt_set,
                                      prompt_tags,
                                      t2i_prompt,
)
from unijax.data.shapes.qa import (
                                      CAPTION_QUESTION,
                                      CHOICE_SUFFIX,
                                      EXIST_NEGATIVE_KINDS,
                                      FAMILIES,
                                      KINDS,
                                      LETTERS,
                                      OPPOSITE,
                                      QA,
                                      RELATION_WORD,
                                      admits,
                                      answer_is_yes,
                                      blind_baseline,
                                      make_question,
                                      parse_weights,
                                      questions,
                                      sample_question,
)
from unijax.data.shapes.scoring import geneval, match_scene, partial_score, score
from unijax.data.shapes.world import (
                                      BACKGROUND,
                                      COLOURS,
                                      IDENTITIES,
                                      IDENTITY_PRIOR,
                                      POPULAR,
                                      POSITION_THRESHOLD,
                                      RELATIONS,
                                      REPEAT_PROB,
                                      SHAPES,
                                      Obj,
                                      Scene,
                                      object_gap,
                                      object_size_range,
                                      relations,
                                      render,
                                      sample_scene,
                                      scene_at,
)

__all__ = [
    # world
    "BACKGROUND", "COLOURS", "IDENTITIES", "IDENTITY_PRIOR", "POPULAR", "POSITION_THRESHOLD", "RELATIONS",
    "REPEAT_PROB", "SHAPES", "Obj", "Scene", "object_gap", "object_size_range", "relations", "render",
    "sample_scene", "scene_at",
    # prompts
    "NUMBER_WORDS", "RELATION_PHRASE", "TAG_WEIGHTS", "TAGS", "PromptSpec", "caption", "join_phrases", "phrase",
    "prompt_set", "prompt_tags", "t2i_prompt",
    # qa
    "CAPTION_QUESTION", "CHOICE_SUFFIX", "EXIST_NEGATIVE_KINDS", "FAMILIES", "KINDS", "LETTERS", "OPPOSITE", "QA",
    "RELATION_WORD", "admits", "answer_is_yes", "blind_baseline", "make_question", "parse_weights", "questions",
    "sample_question",
    # detector / scoring
    "Detection", "detect", "geneval", "match_scene", "partial_score", "score",
    # corpus_text
    "CORPUS_SCENES", "CORPUS_SEED", "corpus",
]
