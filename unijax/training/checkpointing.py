"""Resumable training checkpoints: an Orbax CheckpointManager over `<workdir>/checkpoints`.

Each step directory holds `state` (step, trainable params, optimizer state, RNG), `data` (the grain
iterator state, so a resumed run sees exactly the batches an uninterrupted run would) and `config`
(the resolved config). Saves are asynchronous; Orbax commits a step directory only once it is
complete, so a run killed mid-save resumes from the previous committed step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CannotResume(ValueError):
    """A checkpoint that is intact but cannot resume this run (not a damaged one)."""


class TrainCheckpoints:
    def __init__(self, directory: pathlib.Path, config):
        self.directory = pathlib.Path(directory).absolute()
        self.config = config
        options = ocp.CheckpointManagerOptions(max_to_keep=int(config.train.keep_checkpoints),
                                               enable_async_checkpointing=bool(config.train.async_checkpointing),
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._quiet = _NoSpaceFilter()  # a full disk is our one-line error, not Orbax's threads' tracebacks
        logging.getLogger("absl").addFilter(self._quiet)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def path_of(self, step: int | None) -> pathlib.Path:
        return self.directory / str(step)

    def save(self, step: int, state, data_iter) -> None:
        """Saves `step` (asynchronously with `train.async_checkpointing`). Refused at once, before
        anything is written, when the directory's filesystem has less free space than the state's
        bytes; a write that still runs out of space is one error naming the directory."""
        need = sum(int(x.nbytes) for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
        free = shutil.disk_usage(self.directory).free
        if free < need:
            last = self.latest_step()
            kept = f" (the last checkpoint, {last}, is intact)" if last is not None else ""
            raise ValueError(f"{self.directory}: {_size(free)} free, a checkpoint of this run needs about "
                             f"{_size(need)}; free some space or move train.workdir{kept}")
        with _no_space_as_one_line(self.directory, step):
            self._save(step, state, data_iter)

    def _save(self, step: int, state, data_iter) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            config=ocp.args.JsonSave(json.loads(self.config.to_json_best_effort()))))

    def restore(self, state, data_iter, step: int | None = None):
        """Restores onto `state`'s shapes and shardings (any mesh) and rewinds `data_iter`. Without
        `step`: the newest checkpoint that restores. A damaged one (a truncated or corrupt file) is
        moved to `<directory>.damaged/<step>`, saying so, and the one before it is tried."""
        if step is not None:
            return self._restore(state, data_iter, step)
        steps = sorted(self.manager.all_steps(), reverse=True)
        damaged = []
        for s in steps:
            try:
                restored = self._restore(state, data_iter, s)
            except CannotResume:
                raise
            except Exception as e:  # Orbax / tensorstore / grain errors of a damaged step
                damaged.append(s)
                first = (str(e).strip().splitlines() or [""])[0][:300]
                log.warning("checkpoint %s cannot be restored (%s: %s)%s", self.path_of(s), type(e).__name__, first,
                            f"; trying step {steps[len(damaged)]}" if len(damaged) < len(steps) else "")
                continue
            if damaged:
                self._set_aside(damaged)
                log.warning("resumed from step %d: the newer checkpoint(s) %s were damaged and are moved to %s",
                            s, damaged, self.damaged_dir)
            return restored
        raise ValueError(f"{self.directory}: no checkpoint can be restored (all of {steps} are damaged; the "
                         f"newest's error is above); remove the directory to start over")

    @property
    def damaged_dir(self) -> pathlib.Path:
        return self.directory.with_name(self.directory.name + ".damaged")

    def _set_aside(self, steps) -> None:
        """Moves damaged step directories out of the manager's view (kept for inspection)."""
        if jax.process_index() == 0:
            self.damaged_dir.mkdir(exist_ok=True)
            for s in steps:
                dest = self.damaged_dir / str(s)
                if dest.exists():
                    shutil.rmtree(dest)
                os.replace(self.path_of(s), dest)
        self.manager.reload()

    def _restore(self, state, data_iter, step: int):
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        data_dir = self.path_of(step) / "data"
        own = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if own.is_file() or not data_dir.is_dir():
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(data_iter)))
            return restored["state"]
        # written by another number of processes: without packing the iterator state is the global batch
        # index, the same in every process's file (pipeline.batches: process p reads block p of global batch b)
        others = sorted(data_dir.glob("process_*-of-*.json"))
        if not others:
            raise FileNotFoundError(f"{data_dir}: no data-iterator state to resume from")
        if self.config.data.packing:
            raise CannotResume(f"{self.path_of(step)} was written by {others[0].stem.split('-of-')[1]} processes and "
                             f"data.packing=True forms rows per process: resume packed runs with the same process count")
        states = {f.name: json.loads(f.read_text()) for f in others}
        if len({json.dumps(v, sort_keys=True) for v in states.values()}) != 1:
            raise CannotResume(f"{data_dir}: the processes' iterator states differ ({states}); cannot resume on "
                             f"{jax.process_count()} processes")
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        data_iter.set_state(next(iter(states.values())))
        return restored["state"]

    def write_config(self, path: pathlib.Path) -> None:
        if jax.process_index() == 0:
            path.write_text(self.config.to_json_best_effort(indent=2) + "\n")

    def wait(self) -> None:
        with _no_space_as_one_line(self.directory, None):
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.manager.close()
        finally:
            logging.getLogger("absl").removeFilter(self._quiet)


def _no_space(text: str) -> bool:
    return "No space left on device" in text or "ENOSPC" in text


class _NoSpaceFilter(logging.Filter):
    """Drops Orbax's log records of a write that ran out of space (each with a background thread's
    traceback): `_no_space_as_one_line` reports it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        e = record.exc_info[1] if record.exc_info else None
        texts = [record.getMessage()]
        while e is not None:
            texts.append(str(e))
            e = e.__cause__ or e.__context__
        return not any(_no_space(t) for t in texts)


@contextlib.contextmanager
def _no_space_as_one_line(directory: pathlib.Path, step: int | None):
    """A write that runs out of space: its temporary step directories removed (they hold the space
    the next attempt needs; no committed step is touched) and one error naming the directory."""
    try:
        yield
    except Exception as e:
        if not _no_space(str(e)):
            raise
        if jax.process_index() == 0:
            for tmp in directory.glob(f"{step if step is not None else '*'}.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)
        committed = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]  # Orbax renames on commit
        last = max(committed, default=None)
        where = f" (the last complete checkpoint, {last}, is intact)" if last is not None else ""
        raise ValueError(f"{directory}: a checkpoint write ran out of disk space{where}; free some space or move "
                         f"train.workdir, then rerun to resume") from None


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
