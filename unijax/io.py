"""Atomic writes: an interrupted run never leaves a half-written output behind.

Every file or directory unijax writes for a user (model checkpoints, adapters, reports, plots,
PNG grids, ArrayRecord shards, the shapes tokenizer, analysis JSON) is first written to a hidden
temporary beside its target and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields a hidden temporary path beside `path`, unique to this writer (processes that race to
    write the same cache each write their own), with the same suffix (writers that infer the format
    from it still work). It replaces `path` when the block succeeds and is removed when it fails."""
    path = pathlib.Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = pathlib.Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are shared like any data file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Yields a temporary directory that becomes `out` on success and vanishes on failure."""
    out = pathlib.Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another output path or remove it")
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_outputs(out: pathlib.Path, files: dict[str, Callable[[pathlib.Path], object]]) -> None:
    """files: {name: writer(path)}. Each is written to a hidden temporary beside its target; the
    targets are replaced only after every writer succeeded (none are touched on failure)."""
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        tmps = {name: stack.enter_context(atomic_file(out / name)) for name in files}
        for name, write in files.items():
            write(tmps[name])
    # the renames ran as the stack unwound, after every writer succeeded; a failing writer's exception
    # unwinds it too, and then each temporary is removed with its target untouched


class WorkdirBusyError(ValueError):
    """Another process holds the directory's lock (`directory_lock`)."""


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, what: str = "train.workdir") -> Iterator[None]:
    """Holds an exclusive lock on `<directory>/.lock` (`fcntl.flock`, released by the kernel when the
    process dies) for the block. A second holder is refused at once with `WorkdirBusyError` naming the
    holder (process id, host, start time, written into the lock file)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".lock"
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                holder = json.loads(f.read() or "{}")
            except json.JSONDecodeError:
                holder = {}
            who = (f"process {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"
                   if holder else "another process")
            raise WorkdirBusyError(f"{what}={directory} is in use by {who}; wait for that run to end or choose "
                                   f"another {what}") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
        yield
    finally:
        f.close()  # closing the file releases the lock
