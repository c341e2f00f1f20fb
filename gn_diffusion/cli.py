"""Shared command-line plumbing for train.py, sample.py and the `python -m` entry points."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import UserError, file_system_sentence
from .memory import lower_on_oom

EXIT_USER_ERROR = 2


def split_args(argv: Sequence[str], default_config: str | None) -> tuple[str | None, list[str]]:
    """Split `[CONFIG] [key=value ...]` into the config path and the overrides."""
    args = list(argv)
    first = args[0] if args else None
    if first is not None and first.startswith("-"):
        raise UserError(f"unknown option {first[:40]}; the commands take only --help beside their arguments.")
    if first is not None and "=" not in first:
        return first, args[1:]
    return default_config, args


HELP = ("-h", "--help")
# What sizes a command's work when nothing narrower is known (run_cli's fallback).
SIZES = ("train.batch_size", "sample.batch_size", "model.image_size", "model.base_channels")


def run_settings(*sections: str, default_config: str | None = None,
                 config_of: Callable[[str, list[str]], Any] | None = None) -> Callable[[list[str]], str]:
    """--help's table of a run config's keys (those under `sections`, when given): each key's
    default and, beside it, the value the command would run with: that of the config named
    before --help, or else `default_config`'s (read by `config_of(path, overrides)`, by default
    load_config; a command with neither shows the defaults alone)."""

    def table(args: list[str]) -> str:
        from .config import Config, load_config
        from .typed import settings_help

        path, overrides = split_args(args, default_config)
        read = config_of or (load_config if default_config is not None else None)
        named = bool(args) and "=" not in args[0]
        if path is None or read is None or not (named or Path(path).is_file()):  # run elsewhere: no default file
            return settings_help(Config, sections)
        cfg = read(path, overrides)
        return settings_help(Config, sections, values=(Path(path).name, cfg.to_dict()))

    return table


def help_text(main: Callable, args: list[str]) -> str:
    """A command's --help: its docstring, then its table of keys (from the config dataclasses)."""
    text = (main.__doc__ or "").strip()
    settings = getattr(main, "settings", None)
    return text + ("\n\n" + settings(args) if settings is not None else "")


class OutlivesItsReader:
    """stdout for a command: when its reader goes away (| head), the rest of the output goes
    nowhere and the work goes on, instead of a BrokenPipeError stopping it half-way."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        return self._quietly(self.stream.write, text) or len(text)

    def flush(self) -> None:
        self._quietly(self.stream.flush)

    def _quietly(self, call, *args):
        try:
            return call(*args)
        except BrokenPipeError:
            # the stream's buffered bytes would fail again at exit: point the file at nothing
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
            self.stream = open(os.devnull, "w")
            return None

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def run_cli(main: Callable[[list[str]], None], argv: Sequence[str] | None = None) -> None:
    """Run `main`; a UserError, or a failure of the user's disk (read-only, no permission, full,
    a file where a folder belongs), becomes one line on stderr and exit status 2, no traceback.
    Every command goes through here, so no command needs its own try/except for the disk."""
    args = list(sys.argv[1:] if argv is None else argv)
    asked = next((i for i, arg in enumerate(args) if arg in HELP), None)
    stdout, sys.stdout = sys.stdout, OutlivesItsReader(sys.stdout)
    try:
        with lower_on_oom("running the command", *SIZES):
            if asked is not None:  # inside the try: a bad config named before --help is one sentence
                print(help_text(main, args[:asked]), flush=True)
            else:
                main(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except Exception as exc:
        sentence = file_system_sentence(exc)
        if sentence is None:
            raise  # a bug: keep its traceback
        print(f"error: {sentence}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if isinstance(sys.stdout, OutlivesItsReader):
            sys.stdout.flush()  # while a closed pipe is still caught
            sys.stdout = stdout if sys.stdout.stream is stdout else sys.stdout.stream
