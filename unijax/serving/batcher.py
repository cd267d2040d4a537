"""Requests that arrive together share a decode batch: `Batcher`, one thread in front of an `Engine`.

Chat jobs decode step-wise (`decode.TextStream`), one token per step for every row, each row with its
own sampling settings and key, so a streamed answer sees its tokens as they come. Image jobs (n
images each) decode as rows of one CFG batch, each row with its own key, guidance and sampling
settings. Batches are padded to the smallest compiled batch size (`batch_sizes`)
and prompts to the smallest compiled length (`lengths` for answers, `image_lengths` for image
prompts), so a server compiles its programs once, at start-up (`warm_up`). An answer's KV cache holds
its prompt length plus `max_tokens`. The thread takes the oldest waiting job, then every waiting job of the same
kind that fits beside it; jobs that arrive while a batch decodes wait for the next one.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from unijax.analysis.experts import request_routing
from unijax.inference.engine import PAD_TO
from unijax.inference.sampling import Sampling

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class ChatJob:
    """An answer to one conversation (`Engine.mmu_prompt`'s dict as `prompt`)."""

    prompt: dict
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    emit: Callable[[str, object], None] = lambda kind, value: None  # ("token", id) ... ("done", finish_reason), ("routing", dict)
    cancelled: bool = False
    kind = "chat"


@dataclasses.dataclass(eq=False)
class ImageJob:
    """`n` images of one prompt (token ids); sample j draws from `Engine.image_key(seed, 0, j)`, the
    key `generate --seed` gives the j-th image of a one-prompt call."""

    ids: Sequence[int]
    n: int
    guidance: float
    sampling: Sampling
    seed: int = 0
    emit: Callable[[str, object], None] = lambda kind, value: None  # ("images", {"images": uint8 [n, H, W, 3], "routing"}), ("error", str)
    cancelled: bool = False
    kind = "image"


class Batcher:
    def __init__(self, engine, *, batch_sizes: Sequence[int], lengths: Sequence[int], max_tokens: int,
                 max_images: int = 1, image_lengths: Sequence[int] | None = None, wait_s: float = 0.005,
                 routing: bool = True):
        self.engine = engine
        self.batch_sizes = sorted(int(b) for b in batch_sizes)
        self.lengths = sorted({-(-int(n) // PAD_TO) * PAD_TO for n in lengths})  # prompts pad to multiples of PAD_TO
        # image prompts are short (a caption): short lengths first, so a caption is not padded to a conversation's
        short = [n for n in (32, 64) if n < self.lengths[0]]
        self.image_lengths = sorted({-(-int(n) // PAD_TO) * PAD_TO for n in (image_lengths or short + self.lengths)})
        self.max_tokens = int(max_tokens)
        self.image_slots = sorted({1, int(max_images)})  # understanding images per row: one, or up to max_images
        self.wait_s = float(wait_s)
        # TA-MoE: each request's routing, counted while it decodes (`analysis.experts.request_routing`)
        self.routing = bool(routing) and engine.cfg.ffn == "ta_moe"
        self.jobs: queue.Queue = queue.Queue()
        self.pending: list = []  # taken from the queue, not yet batched (another kind went first)
        self.batches = {"chat": [], "image": []}  # real rows of each decode batch run
        self.decode_s = {"chat": 0.0, "image": 0.0}  # seconds spent decoding each kind
        self.busy = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="unijax-batcher", daemon=True)

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def rows_for(self, n: int) -> int:
        return next(b for b in self.batch_sizes if b >= n)

    def length_for(self, n: int, kind: str = "chat") -> int:
        """The compiled prompt length for a prompt of `n` tokens (ValueError above the longest)."""
        lengths = self.lengths if kind == "chat" else self.image_lengths
        for length in lengths:
            if length >= n:
                return length
        raise ValueError(f"the prompt has {n} tokens, more than the longest compiled prompt ({lengths[-1]})")

    # -- life ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.jobs.put(None)
        self._thread.join(timeout=30)

    def submit(self, job) -> None:
        self.jobs.put(job)

    @property
    def depth(self) -> int:
        """Jobs waiting for a batch (not counting those decoding now)."""
        return self.jobs.qsize() + len(self.pending)

    def stats(self) -> dict:
        out = {"queue_depth": self.depth, "busy": self.busy}
        for kind, rows in self.batches.items():
            out[f"{kind}_batches"] = len(rows)
            out[f"{kind}_mean_batch"] = float(np.mean(rows)) if rows else 0.0
            out[f"{kind}_decode_s"] = round(self.decode_s[kind], 3)
        both = self.batches["chat"] + self.batches["image"]
        out["mean_batch"] = float(np.mean(both)) if both else 0.0
        return out

    # -- compile -------------------------------------------------------------------------------
    def warm_up(self, progress: Callable[[int, int, str], None] = lambda i, n, what: None) -> None:
        """Compiles every program a request can reach: per batch size, the prompt of each compiled
        length (with each image-slot count), the decoding step and the image decoder."""
        e = self.engine
        prompt = e.mmu_prompt([("?", None)], [])  # short: fits the shortest length; the slots are given below
        text_ids = e.tokenizer.t2i_ids("a")
        work = [(b, n, f"chat, {k} image slot{'s' * (k > 1)},") for b in self.batch_sizes for n in self.lengths
                for k in self.image_slots]
        work += [(b, n, "image") for b in self.batch_sizes for n in self.image_lengths]
        for i, (b, n, kind) in enumerate(work):
            progress(i, len(work), f"{kind} batch {b} x {n} tokens")
            if kind.startswith("chat"):
                batch = e.mmu_batch([prompt], b, length=n, images_per_row=int(kind.split()[1]))
                stream = e.generator.stream(batch["tokens"], batch["modality"], batch["mask"], batch["pixels"],
                                            cache_len=n + self.max_tokens, keys=self._keys([0] * b), temperature=np.zeros(b),
                                            top_k=np.zeros(b, np.int32), top_p=np.ones(b))
                stream.step()
            else:
                e.image_rows([text_ids], [e.image_key(0, 0, 0)], [1.0], [Sampling(temperature=1.0)], b, length=n,
                             return_load=self.routing)
        progress(len(work), len(work), "done")

    @staticmethod
    def _keys(seeds):
        return jax.numpy.stack([jax.random.key(int(s)) for s in seeds])

    # -- the loop ------------------------------------------------------------------------------
    def _next_jobs(self) -> list:
        """Blocks for the oldest job; returns it with every waiting job of its kind that fits."""
        if not self.pending:
            job = self.jobs.get()
            if job is None:
                return []
            self.pending.append(job)
        time.sleep(self.wait_s)  # let requests that arrive together land in the same batch
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._stop.set()
                break
            self.pending.append(job)
        self.pending = [j for j in self.pending if not j.cancelled]
        if not self.pending:
            return []
        first = self.pending[0]
        take, rows = [], 0
        for job in self.pending:
            if job.kind != first.kind:
                continue
            need = 1 if job.kind == "chat" else job.n
            if take and rows + need > self.max_batch:
                continue
            take.append(job)
            rows += need
        taken = {id(j) for j in take}
        self.pending = [j for j in self.pending if id(j) not in taken]
        return take

    def _run(self) -> None:
        while not self._stop.is_set():
            jobs = []
            try:
                jobs = self._next_jobs()
                if not jobs:
                    continue
                self.busy = True
                t = time.perf_counter()
                if jobs[0].kind == "chat":
                    self._chat(jobs)
                else:
                    self._images(jobs)
                self.decode_s[jobs[0].kind] += time.perf_counter() - t
            except Exception as e:  # a failed batch fails its requests, not the server
                log.exception("decode batch failed")
                for job in jobs:
                    job.emit("error", f"{type(e).__name__}: {e}")
            finally:
                self.busy = False

    def _chat(self, jobs: list[ChatJob]) -> None:
        e = self.engine
        b = self.rows_for(len(jobs))
        length = self.length_for(max(len(j.prompt["ids"]) for j in jobs))
        most = max(len(j.prompt["pixels"]) for j in jobs)
        batch = e.mmu_batch([j.prompt for j in jobs], b, length=length,
                            images_per_row=next(k for k in self.image_slots if k >= most))
        pad = [jobs[0]] * (b - len(jobs))
        rows = jobs + pad
        stream = e.generator.stream(
            batch["tokens"], batch["modality"], batch["mask"], batch["pixels"],
            cache_len=batch["tokens"].shape[1] + self.max_tokens,
            keys=self._keys([j.seed for j in rows]), temperature=np.asarray([j.temperature for j in rows], np.float32),
            top_k=np.asarray([j.top_k for j in rows], np.int32), top_p=np.asarray([j.top_p for j in rows], np.float32))
        self.batches["chat"].append(len(jobs))
        produced = [0] * len(jobs)
        load = stream.load.copy()  # [L, B, X]: the prompts', then each answer token's (EOS aside)
        live = set(range(len(jobs)))
        eos = e.cfg.text.eos_token_id
        while live := {i for i in live if not jobs[i].cancelled}:
            tokens, fed = stream.step()
            fed = np.asarray(fed) if self.routing else None  # to the host only when routing is reported
            for i in sorted(live):
                token = int(tokens[i])
                if token == eos:
                    live.discard(i)
                    self._finish(jobs[i], "stop", load[:, i])
                    continue
                produced[i] += 1
                if fed is not None:
                    load[:, i] += fed[:, i]
                jobs[i].emit("token", token)
                if produced[i] >= jobs[i].max_tokens:
                    live.discard(i)
                    self._finish(jobs[i], "length", load[:, i])

    def _finish(self, job: ChatJob, reason: str, load: np.ndarray) -> None:
        job.emit("done", reason)
        if self.routing:
            job.emit("routing", self._routing(load, "mmu"))

    def _routing(self, load: np.ndarray, task: str) -> dict:
        try:
            return request_routing(load, self.engine.cfg, task)
        except Exception as e:  # statistics never fail a request
            log.exception("routing statistics failed")
            return {"error": f"{type(e).__name__}: {e}"}

    def _images(self, jobs: list[ImageJob]) -> None:
        e = self.engine
        rows = [(job, j) for job in jobs for j in range(job.n)]
        out = {id(job): [] for job in jobs}
        counts = {id(job): 0.0 for job in jobs}
        for lo in range(0, len(rows), self.max_batch):
            chunk = rows[lo:lo + self.max_batch]
            length = self.length_for(max(len(job.ids) for job, _ in chunk), "image")
            pixels = e.image_rows([job.ids for job, _ in chunk], [e.image_key(job.seed, 0, j) for job, j in chunk],
                                  [job.guidance for job, _ in chunk], [job.sampling for job, _ in chunk], self.rows_for(len(chunk)),
                                  length=length, return_load=self.routing)
            if self.routing:
                pixels, load = pixels
                for r, (job, _) in enumerate(chunk):
                    counts[id(job)] = counts[id(job)] + load[:, r]
            self.batches["image"].append(len(chunk))
            for (job, _), img in zip(chunk, pixels):
                out[id(job)].append(img)
        for job in jobs:
            routing = self._routing(counts[id(job)], "t2i") if self.routing else None
            job.emit("images", {"images": np.stack(out[id(job)]), "routing": routing})
