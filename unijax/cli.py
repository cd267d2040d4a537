"""How every unijax command line tool ends on a user error: one line `error: <message>`, exit status 2.

    if __name__ == "__main__":
        cli.run(main)            # absl CLIs (instead of app.run(main)); `argv=`, `flags_parser=` as app.run's
        cli.run_argparse(main)   # argparse CLIs: main(argv) gets sys.argv[1:] without --verbosity

A user error is a mistake in the command line or in what it names, not in the program:
  * while parsing flags: any absl `flags.Error` (unknown flag, a value of the wrong type, a missing
    required flag), the errors ml_collections' `config_flags` raises for a bad `--config.a.b=v`
    override (KeyError, or the AttributeError wrapping one, for a misspelt key; IndexError;
    ValueError; OSError), a config file that cannot be loaded; argparse's usage errors;
  * raised by `main`: `UserError`, `absl.app.UsageError`, ValueError (the project's own checks and
    error classes derive from it), KeyError (a name looked up in a table or a config), and the path
    errors FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError.
Any other exception is taken for a bug and keeps Python's traceback. With `--verbosity=1` or higher
on the command line (`-v 1`, `--verbosity 2`, ...) a user error prints its traceback before the line
(a ValueError can also be a bug deep in a library: rerun so to see where). The verbosity is read from
argv because a flag parsing error happens before absl knows it (and some CLIs reset it in main).
Without `--verbosity`, absl logging is at WARNING (Orbax logs each checkpoint read and write at INFO;
`--verbosity=0` shows them).
"""

from __future__ import annotations

import argparse
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import app, flags, logging
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

__all__ = ["UserError", "run", "run_argparse", "fail", "message", "verbosity"]

PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


class UserError(Exception):
    """A mistake of the user's (a bad flag, path or name) that the message alone explains."""


class _ParseError(UserError):
    """A command line the flag or argument parser refused."""


def _main_errors():
    return (UserError, app.UsageError, ValueError, KeyError, *PATH_ERRORS)


_verbose = False  # set by run / run_argparse from their argv


def verbosity(argv: Sequence[str], short: bool = True) -> int:
    """The last `--verbosity N` / `--verbosity=N` (and with `short`, `-v N` / `-v=N`) of `argv`, else -1."""
    level = -1
    for i, a in enumerate(argv):
        if a == "--":
            break
        m = re.fullmatch(r"--?(?:verbosity|v)(?:=(.*))?" if short else r"--verbosity(?:=(.*))?", a)
        if m:
            value = m.group(1) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else "")
            try:
                level = int(value)
            except ValueError:
                pass
    return level


def message(err: BaseException) -> str:
    """`err` as one line: a KeyError unwrapped (no repr quotes, no literal `\\n`), line breaks joined."""
    if isinstance(err, AttributeError) and err.args and isinstance(err.args[0], KeyError):
        err = err.args[0]  # ConfigDict.__getattr__ raises AttributeError(KeyError(...))
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        first, _, rest = err.args[0].partition("\n")  # ConfigDict: "'key'\nDid you mean ...?"
        if re.fullmatch(r"'[^'\s]*'|[^'\s]+", first):
            first = f"unknown key '{first.strip(chr(39))}'"
        text = first + ("\n" + rest if rest else "")
    else:
        text = str(err) or type(err).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback (most recent call last)" in text:  # a config file's error, its traceback in the message
        line = f"{lines[0].rstrip(':')}: {lines[-1]}"
    elif "Failed loading config file" in text:  # ml_collections: the paths it tried, the OSError last
        line = f"cannot load the config file: {lines[-1]}"
    else:
        line = "; ".join(lines)
    line = re.sub(r"\[Errno \d+\] ", "", line)
    return re.sub(r"^flag (--\S)", r"\1", line)  # absl's "flag --x=v: ..." -> "--x=v: ..."


def _config_override(err: BaseException) -> str | None:
    """`--config.a.b` when `err` was raised checking that override (in ml_collections' `_ConfigFlag`)."""
    found, tb = None, err.__traceback__
    while tb is not None:
        f, tb = tb.tb_frame, tb.tb_next
        flag, path = f.f_locals.get("self"), f.f_locals.get("field_path", f.f_locals.get("override"))
        if f.f_globals.get("__name__", "").startswith("ml_collections.config_flags") and isinstance(path, str) \
                and isinstance(getattr(flag, "name", None), str):
            found = f"--{flag.name}.{path}"
    return found


def fail(err: BaseException | str, status: int = 2, *, text: str | None = None) -> NoReturn:
    """Prints `error: <text or message(err)>` to stderr and exits `status`.

    Under `--verbosity` >= 1 (as `run` / `run_argparse` read it; never when a CLI's `main` is called
    from Python) the exception's traceback comes first.
    """
    if _verbose and isinstance(err, BaseException):
        traceback.print_exception(err)
    print(f"error: {text or (err if isinstance(err, str) else message(err))}", file=sys.stderr, flush=True)
    sys.exit(status)


def _config_file_errors() -> None:
    """Raises the OSError of a `DEFINE_config_file` flag whose file did not load (ml_collections defers it)."""
    for name in list(flags.FLAGS):
        flag = flags.FLAGS[name]
        if isinstance(flag.parser, ConfigFileFlagParser) and flag.value is not None:
            getattr(flag.value, "_unijax_cli_probe", None)  # an unloadable file's placeholder raises its OSError


def run(main: Callable, *, argv: Sequence[str] | None = None, flags_parser: Callable | None = None) -> NoReturn:
    """absl's `app.run(main, argv, flags_parser)` with user errors as one line and exit status 2.

    `flags_parser` defaults to `absl.flags.FLAGS` itself (not absl's `parse_flags_with_usage`, which
    prints "FATAL Flags parsing error" and exits 1).
    """
    global _verbose

    argv = list(sys.argv if argv is None else argv)
    _verbose = verbosity(argv[1:]) >= 1
    parse = flags_parser or flags.FLAGS

    def parse_flags(args):
        try:
            parsed = parse(args)
            _config_file_errors()
            return parsed
        except SyntaxError as e:  # a config file that does not compile
            fail(e, text=f"{e.filename}:{e.lineno}: {e.msg} (a config file with a syntax error)")
        except (flags.Error, KeyError, AttributeError, IndexError, ValueError, OSError) as e:
            if isinstance(e, AttributeError) and not (e.args and isinstance(e.args[0], KeyError)):
                raise  # not ConfigDict's wrapped KeyError: a bug
            override = _config_override(e)
            hint = " (--helpshort lists the flags)" if isinstance(e, flags.UnrecognizedFlagError) else ""
            fail(e, text=f"{override + ': ' if override else ''}{message(e)}{hint}")

    def checked_main(args):
        if not flags.FLAGS["verbosity"].present:  # Orbax logs every read and write at INFO; --verbosity=0 shows them
            logging.set_verbosity(logging.WARNING)
        try:
            return main(args)
        except _main_errors() as e:
            fail(e)

    app.run(checked_main, argv=argv, flags_parser=parse_flags)


def _raise_parse_error(self, msg):
    raise _ParseError(msg)


def run_argparse(main: Callable, argv: Sequence[str] | None = None) -> NoReturn:
    """Calls `main(argv)` (default sys.argv[1:], `--verbosity` removed) with user errors as one line, exit 2.

    argparse's own errors (an unknown option, a bad choice or type) become one line too, instead of
    the usage text and `prog: error: ...`. `main`'s return value is ignored: success exits 0.
    """
    global _verbose
    argv = list(sys.argv[1:] if argv is None else argv)
    _verbose = verbosity(argv, short=False) >= 1
    rest = [a for i, a in enumerate(argv)  # the CLIs' parsers do not know --verbosity
            if not (a == "--verbosity" or a.startswith("--verbosity=") or (i and argv[i - 1] == "--verbosity"))]
    logging.set_verbosity(logging.WARNING if verbosity(argv, short=False) < 0 else verbosity(argv, short=False))
    error, argparse.ArgumentParser.error = argparse.ArgumentParser.error, _raise_parse_error
    try:
        main(rest)
    except _main_errors() as e:
        fail(e)
    finally:
        argparse.ArgumentParser.error = error
    sys.exit(0)
