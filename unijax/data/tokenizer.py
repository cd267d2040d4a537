"""Text tokenizers and the Janus-Pro chat format, as token-id layouts.

Two implementations share one interface (`Tokenizer`):

- `shapes_tokenizer(data_dir)`: a small word-level sentencepiece (BPE) model trained on every
  string of the synthetic shapes world (`unijax.data.shapes.corpus()`), with the special ids of the
  `tiny` model preset (pad 0, bos 1, eos 2, image 3, begin-of-image 4, end-of-image 5). It is built
  deterministically (same bytes every time) and cached as `<data_dir>/shapes_sp_v2.model`.
- `hf_tokenizer(path)`: a transformers tokenizer loaded from a local directory (the real Janus-Pro
  checkpoints' LLaMA/DeepSeek `tokenizer.json`), special ids looked up by the Janus token strings.

`load_tokenizer(spec, data_dir)` picks one from the `data.tokenizer` config value, and
`check_compatible(tokenizer, model_cfg)` checks it against a model config.

The chat format follows transformers' Janus processor and chat template
(`models/janus/processing_janus.py`, `convert_janus_weights_to_hf.py`). Understanding (MMU):

    [bos] {system_prompt}<|User|>: <begin_of_image><image_placeholder>*N<end_of_image>\\n{question}\\n\\n
          <|Assistant|>: {answer}<eos><|User|>: {question 2}\\n\\n<|Assistant|>: {answer 2}<eos>

and text-to-image (T2I), never with a system prompt:

    [bos] <|User|>: {prompt}\\n\\n<|Assistant|>:<begin_of_image>

Text segments are encoded separately (the image span and the answer boundaries are exact token
boundaries, so the loss mask covers exactly the answer tokens).
"""

from __future__ import annotations

import io
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm

from unijax.checkpoints import TOKENIZER_DIR
from unijax.contract import IMAGE_MARKER
from unijax.data import shapes
from unijax.io import atomic_file

# -- the Janus chat format ---------------------------------------------------------------------

USER_TAG = "<|User|>"
ASSISTANT_TAG = "<|Assistant|>"
USER_PREFIX = USER_TAG + ": "           # starts every user turn
USER_SUFFIX = "\n\n"                    # the chat template's seps[0], after every user turn
ASSISTANT_PREFIX = ASSISTANT_TAG + ":"  # the generation prompt; an answer follows as " {answer}"
IMAGE_SEP = "\n"                        # between the image span and the question text

# transformers' `processing_janus.DEFAULT_SYSTEM_PROMPT`, prepended to MMU prompts by the
# converted Janus-Pro processors (`use_default_system_prompt=True`); not used for T2I.
JANUS_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language.\n\n"
)

# The special-token strings of the Janus-Pro (DeepSeek LLM) tokenizer, by role.
JANUS_SPECIAL_TOKENS = {
    "pad": "<\uff5c\u2581pad\u2581\uff5c>",                       # <｜▁pad▁｜>
    "bos": "<\uff5cbegin\u2581of\u2581sentence\uff5c>",           # <｜begin▁of▁sentence｜>
    "eos": "<\uff5cend\u2581of\u2581sentence\uff5c>",             # <｜end▁of▁sentence｜>
    "image": "<image_placeholder>",
    "boi": "<begin_of_image>",
    "eoi": "<end_of_image>",
}

ROLES = ("pad", "bos", "eos", "image", "boi", "eoi")


class Tokenizer:
    """Text <-> ids plus the Janus-Pro chat layouts used by the data pipeline and generation CLIs.

    Subclasses implement `_encode` and `_decode`; every id attribute is set by the constructor.

    Attributes:
      vocab_size: number of ids the tokenizer can produce (ids are in `[0, vocab_size)`).
      pad_id, bos_id, eos_id: text special ids.
      image_id: the understanding-image placeholder (one per vision patch).
      boi_id, eoi_id: begin / end of an image span.
      system_prompt: text put before the first user turn of MMU prompts (after bos).
      source: where the tokenizer came from (a file or directory), for error messages.
    """

    def __init__(self, *, vocab_size: int, ids: dict[str, int], system_prompt: str = "", source: str = ""):
        missing = [r for r in ROLES if r not in ids]
        if missing:
            raise ValueError(f"tokenizer {source}: missing special ids for {missing}")
        self.vocab_size = int(vocab_size)
        self.pad_id, self.bos_id, self.eos_id = int(ids["pad"]), int(ids["bos"]), int(ids["eos"])
        self.image_id, self.boi_id, self.eoi_id = int(ids["image"]), int(ids["boi"]), int(ids["eoi"])
        self.system_prompt = system_prompt
        self.source = source

    # -- to implement --------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    # -- text ----------------------------------------------------------------------------------
    @property
    def special_ids(self) -> dict[str, int]:
        """The special ids by role (`pad bos eos image boi eoi`)."""
        return {"pad": self.pad_id, "bos": self.bos_id, "eos": self.eos_id, "image": self.image_id,
                "boi": self.boi_id, "eoi": self.eoi_id}

    def encode(self, text: str) -> list[int]:
        """Text -> ids, no bos/eos added."""
        return [int(i) for i in self._encode(text)] if text else []

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. Special ids (pad, bos, eos, image, boi, eoi) and ids outside
        `[0, vocab_size)` (a model's vocab may be larger than its tokenizer's) are skipped."""
        skip = set(self.special_ids.values())
        flat = np.asarray(ids if hasattr(ids, "__array__") else list(ids), np.int64).reshape(-1).tolist()
        keep = [i for i in flat if 0 <= i < self.vocab_size and i not in skip]
        return self._decode(keep) if keep else ""

    # -- chat layouts --------------------------------------------------------------------------
    def mmu_ids(self, turns: Sequence[Sequence[str | None]], num_image_tokens: int,
                system_prompt: str | None = None, num_images: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """An understanding conversation -> `(ids int32 [n], is_image bool [n], is_answer bool [n])`.

        `turns` are `(user, assistant)` pairs; the first user turn carries the image
        (`boi`, `num_image_tokens` x `image_id`, `eoi`; no image when `num_image_tokens == 0`).
        `is_answer` flags every assistant answer token and the eos that ends it (the tokens the
        loss is on); `is_image` flags the image placeholder slots (not boi/eoi). The last turn's
        assistant may be `None`: the layout then ends with the generation prompt
        `<|Assistant|>:` (what a generation CLI feeds the model). Texts are stripped, as the
        Janus chat template does. `system_prompt` overrides the tokenizer's default.

        `num_images > 1`: the user texts hold exactly that many `<image>` marks and each becomes an
        image block in place (as Janus's processor replaces `<image_placeholder>`). One image goes
        in place too when its question holds a mark (`"what is this?\n<image>"`), else first.
        """
        if not turns:
            raise ValueError("mmu_ids: a conversation needs at least one (user, assistant) turn")
        if num_image_tokens < 0:
            raise ValueError(f"mmu_ids: num_image_tokens={num_image_tokens} must be >= 0")
        system = self.system_prompt if system_prompt is None else system_prompt
        ids: list[int] = [self.bos_id]
        image: list[bool] = [False]
        answer: list[bool] = [False]

        def add(tokens: list[int], *, is_image: bool = False, is_answer: bool = False):
            ids.extend(tokens)
            image.extend([is_image] * len(tokens))
            answer.extend([is_answer] * len(tokens))

        def add_image():
            add([self.boi_id])
            add([self.image_id] * num_image_tokens, is_image=True)
            add([self.eoi_id])

        marks = sum((t[0] or "").count(IMAGE_MARKER) for t in turns)
        in_place = num_images > 1 or (marks > 0 and num_image_tokens > 0)
        if in_place:
            if marks != num_images:
                raise ValueError(f"mmu_ids: {num_images} images but {marks} '{IMAGE_MARKER}' marks in the user turns")

        for k, turn in enumerate(turns):
            if len(turn) != 2:
                raise ValueError(f"mmu_ids: turn {k} is {turn!r}, expected a (user, assistant) pair")
            user, assistant = turn
            user = (user or "").strip()
            if in_place:
                first, *rest = user.split(IMAGE_MARKER)
                add(self.encode((system if k == 0 else "") + USER_PREFIX + first))
                for piece in rest:
                    add_image()
                    add(self.encode(piece))
                add(self.encode(USER_SUFFIX + ASSISTANT_PREFIX))
            elif k == 0 and num_image_tokens > 0:
                add(self.encode(system + USER_PREFIX))
                add_image()
                add(self.encode(IMAGE_SEP + user + USER_SUFFIX + ASSISTANT_PREFIX))
            else:
                add(self.encode((system if k == 0 else "") + USER_PREFIX + user + USER_SUFFIX + ASSISTANT_PREFIX))
            if assistant is None:
                if k != len(turns) - 1:
                    raise ValueError(f"mmu_ids: turn {k} has no answer; only the last turn may be open (None)")
                break
            add(self.encode(" " + assistant.strip()), is_answer=True)
            add([self.eos_id], is_answer=True)
        return np.asarray(ids, np.int32), np.asarray(image, bool), np.asarray(answer, bool)

    def t2i_ids(self, prompt: str) -> np.ndarray:
        """A text-to-image prompt -> ids int32: bos, the chat format, then boi.

        The caller appends the image code slots and eoi. No system prompt (as Janus-Pro)."""
        body = self.encode(USER_PREFIX + prompt.strip() + USER_SUFFIX + ASSISTANT_PREFIX)
        return np.asarray([self.bos_id, *body, self.boi_id], np.int32)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.source!r}, vocab_size={self.vocab_size}, "
                f"special_ids={self.special_ids})")


# -- sentencepiece: the shapes-world tokenizer ------------------------------------------------

SHAPES_MODEL_FILE = "shapes_sp_v2.model"  # bump the version whenever shapes.corpus() changes
# Pieces of the shapes model, by role; ids must equal the tiny preset's (`unijax/models/presets.py`).
SHAPES_IDS = {"pad": 0, "bos": 1, "eos": 2, "image": 3, "boi": 4, "eoi": 5}
SHAPES_UNK_ID = 6
SHAPES_CONTROL = ("<image_placeholder>", "<begin_of_image>", "<end_of_image>")  # ids 3, 4, 5
SHAPES_USER_DEFINED = (USER_TAG, ASSISTANT_TAG, "\n")  # single pieces, ids 7, 8, 9
SHAPES_SEED = 0


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (serialized proto bytes). Picklable (grain worker processes)."""

    def __init__(self, model_proto: bytes, *, source: str = "", system_prompt: str = ""):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        sp = self._sp
        ids = {"pad": sp.pad_id(), "bos": sp.bos_id(), "eos": sp.eos_id()}
        for role, piece in zip(("image", "boi", "eoi"), SHAPES_CONTROL):
            pid = sp.piece_to_id(piece)
            ids[role] = -1 if sp.id_to_piece(pid) != piece else pid
        super().__init__(vocab_size=sp.get_piece_size(), ids=ids, system_prompt=system_prompt, source=source)

    def _encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def pieces(self, text: str) -> list[str]:
        """The pieces of `text` (for inspection)."""
        return self._sp.encode(text, out_type=str)

    def __getstate__(self) -> dict[str, Any]:
        return {"model_proto": self._proto, "source": self.source, "system_prompt": self.system_prompt}

    def __setstate__(self, state: dict[str, Any]):
        self.__init__(state["model_proto"], source=state["source"], system_prompt=state["system_prompt"])


def _shapes_training_text(corpus: Sequence[str]) -> list[str]:
    """Training sentences: every corpus string at the start of a segment and after a space (the
    two contexts the chat format puts text in), plus the chat scaffolding."""
    texts = [USER_PREFIX + USER_SUFFIX + ASSISTANT_PREFIX]
    for s in sorted(set(corpus)):
        texts.extend([s, " " + s])
    return texts


def train_shapes_model(corpus: Sequence[str], vocab_size: int = 1024) -> bytes:
    """Trains the shapes sentencepiece model on `corpus`; returns the serialized model.

    Deterministic: a fixed seed, one thread, the whole input in order, no file paths in the proto.
    BPE without a hard vocab limit learns every word of a small closed corpus as one piece (up to
    `vocab_size` pieces in all); identity normalization, no dummy prefix and kept whitespace make
    `decode(encode(s)) == s` for any text, byte fallback covering characters the corpus lacks.
    """
    spm.set_random_generator_seed(SHAPES_SEED)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_shapes_training_text(corpus)), model_writer=buf,
        model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False,
        pad_id=SHAPES_IDS["pad"], bos_id=SHAPES_IDS["bos"], eos_id=SHAPES_IDS["eos"], unk_id=SHAPES_UNK_ID,
        control_symbols=list(SHAPES_CONTROL), user_defined_symbols=list(SHAPES_USER_DEFINED),
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        split_by_unicode_script=False, character_coverage=1.0, byte_fallback=True,
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
        minloglevel=2)
    return buf.getvalue()


def _check_shapes_ids(tok: SentencePieceTokenizer, path: pathlib.Path, vocab_size: int):
    got = tok.special_ids
    bad = {r: (got[r], want) for r, want in SHAPES_IDS.items() if got[r] != want}
    if bad:
        detail = ", ".join(f"{r}={g} (expected {w})" for r, (g, w) in bad.items())
        raise ValueError(f"sentencepiece model {path} has special ids {detail}; the shapes tokenizer needs "
                         f"{SHAPES_IDS} (the tiny preset's). Delete {path} to rebuild it.")
    if tok.vocab_size > vocab_size:
        raise ValueError(f"sentencepiece model {path} has {tok.vocab_size} pieces, more than vocab_size="
                         f"{vocab_size}. Delete {path} to rebuild it with this vocab size.")


def shapes_tokenizer(data_dir: str | os.PathLike, vocab_size: int | None = None,
                     system_prompt: str = "") -> SentencePieceTokenizer:
    """The shapes-world tokenizer, cached as `<data_dir>/shapes_sp_v2.model` (built when missing).

    `vocab_size` caps the number of pieces (default 1024, the tiny preset's text vocab). The
    model is written to a temporary file and renamed into place, so a killed process never
    leaves a partial file and concurrent builders (same bytes) do not conflict. A cached model
    with other special ids, or more pieces than `vocab_size`, is an error naming the file.
    """
    vocab_size = 1024 if vocab_size is None else int(vocab_size)
    data_dir = pathlib.Path(data_dir)
    path = data_dir / SHAPES_MODEL_FILE
    if not path.exists():
        proto = train_shapes_model(shapes.corpus(), vocab_size)
        data_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(proto)
                f.flush()
                os.fsync(f.fileno())
    try:
        tok = SentencePieceTokenizer(path.read_bytes(), source=str(path), system_prompt=system_prompt)
    except (RuntimeError, OSError) as e:
        raise ValueError(f"cannot load sentencepiece model {path} ({e}); delete it to rebuild it") from e
    _check_shapes_ids(tok, path, vocab_size)
    return tok


# -- transformers: real checkpoints ----------------------------------------------------------

class HFTokenizer(Tokenizer):
    """A transformers tokenizer (`PreTrainedTokenizerFast`) with the Janus special ids."""

    def __init__(self, tok, ids: dict[str, int], *, source: str = "", system_prompt: str = JANUS_SYSTEM_PROMPT):
        self.hf = tok
        super().__init__(vocab_size=len(tok), ids=ids, system_prompt=system_prompt, source=source)

    def _encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def _decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def hf_tokenizer(path: str | os.PathLike, system_prompt: str = JANUS_SYSTEM_PROMPT) -> HFTokenizer:
    """Loads a transformers tokenizer from a LOCAL directory (never downloads).

    The special ids are looked up by the Janus-Pro token strings (`JANUS_SPECIAL_TOKENS`); for
    pad/bos/eos the tokenizer's own declared token is the fallback. A missing token is an error
    naming the directory and the token. `system_prompt` defaults to Janus-Pro's MMU system prompt.
    """
    path = pathlib.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist (expected a local directory with "
                                f"tokenizer.json / tokenizer_config.json, e.g. a downloaded Janus-Pro checkpoint)")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises several types for a bad directory
        raise ValueError(f"cannot load a transformers tokenizer from {path}: {type(e).__name__}: {e}") from e
    vocab = tok.get_vocab()
    ids: dict[str, int] = {}
    for role in ROLES:
        candidates = [JANUS_SPECIAL_TOKENS[role]]
        declared = getattr(tok, f"{role}_token", None) if role in ("pad", "bos", "eos") else None
        if isinstance(declared, str) and declared not in candidates:
            candidates.append(declared)
        found = [vocab[c] for c in candidates if c in vocab]
        if not found:
            raise ValueError(f"tokenizer in {path} has no {role} token {' or '.join(map(repr, candidates))}; "
                             f"Janus-Pro needs it (add it as a special token to the tokenizer)")
        ids[role] = found[0]
    return HFTokenizer(tok, ids, source=str(path), system_prompt=system_prompt)


# -- selection and checks --------------------------------------------------------------------

# the files of a transformers tokenizer / processor directory a model checkpoint carries (`<ckpt>/tokenizer`)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json", "processor_config.json",
                   "preprocessor_config.json")


def has_tokenizer(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a transformers tokenizer (its files are not read)."""
    d = pathlib.Path(directory)
    return any((d / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def carried_tokenizer(directory: str | os.PathLike) -> dict[str, bytes]:
    """The `TOKENIZER_FILES` of `directory` as a checkpoint carries them, `{"tokenizer/<name>": bytes}`
    (the `extra_files` of a checkpoint writer); empty when it holds no tokenizer."""
    d = pathlib.Path(directory)
    if not has_tokenizer(d):
        return {}
    return {f"{TOKENIZER_DIR}/{n}": (d / n).read_bytes() for n in TOKENIZER_FILES if (d / n).is_file()}


DEFAULT_TOKENIZER = "shapes"  # data.tokenizer's default: the shapes world's sentencepiece model
DEFAULT_DATA_DIR = "data"      # data.dir's default: where built artefacts (that model) are cached


def resolve_spec(spec: str, init_from: str = "") -> str:
    """`data.tokenizer` with `"checkpoint"` resolved to the tokenizer the `init_from` checkpoint
    carries (`<init_from>/tokenizer`, copied there by `unijax.convert` and by every export)."""
    if spec != "checkpoint":
        return spec
    if not init_from:
        raise ValueError("data.tokenizer=checkpoint reads <init_from>/tokenizer, but init_from is empty")
    path = pathlib.Path(init_from) / TOKENIZER_DIR
    if not has_tokenizer(path):
        raise ValueError(f"data.tokenizer=checkpoint: {path} holds no tokenizer (convert the checkpoint with "
                         f"python -m unijax.convert from a directory with tokenizer files, or set data.tokenizer "
                         f"to a tokenizer directory)")
    return str(path)


def load_tokenizer(spec: str, data_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer named by the `data.tokenizer` config value: `"shapes"` (built/cached under
    `data_dir`) or a local directory holding a transformers tokenizer."""
    if not spec:
        raise ValueError("data.tokenizer is empty: set it to 'shapes' or to a local tokenizer directory")
    if spec == "shapes":
        return shapes_tokenizer(data_dir)
    if not pathlib.Path(spec).is_dir():
        raise ValueError(f"data.tokenizer={spec!r} is neither 'shapes' nor an existing directory with a "
                         f"transformers tokenizer (tokenizer.json / tokenizer_config.json)")
    try:
        return hf_tokenizer(spec)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"data.tokenizer={spec!r}: {e}") from e


def check_compatible(tokenizer: Tokenizer, model_cfg) -> None:
    """Raises if the tokenizer's special ids or vocab size do not fit a `JanusConfig`."""
    want = {"pad": ("model.text.pad_token_id", model_cfg.text.pad_token_id),
            "bos": ("model.text.bos_token_id", model_cfg.text.bos_token_id),
            "eos": ("model.text.eos_token_id", model_cfg.text.eos_token_id),
            "image": ("model.image_token_id", model_cfg.image_token_id),
            "boi": ("model.boi_token_id", model_cfg.boi_token_id),
            "eoi": ("model.eoi_token_id", model_cfg.eoi_token_id)}
    got = tokenizer.special_ids
    problems = [f"tokenizer {role}_id={got[role]} but {key}={value}"
                for role, (key, value) in want.items() if got[role] != value]
    if tokenizer.vocab_size > model_cfg.text.vocab_size:
        problems.append(f"tokenizer vocab_size={tokenizer.vocab_size} > model.text.vocab_size="
                        f"{model_cfg.text.vocab_size}")
    if problems:
        raise ValueError(f"tokenizer {tokenizer.source or type(tokenizer).__name__} does not fit the model config "
                         f"(data.tokenizer vs model): " + "; ".join(problems))
