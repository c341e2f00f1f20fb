"""Shared command-line plumbing for train.py, sample.py and the `python -m` entry points."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from .errors import UserError, file_system_sentence

EXIT_USER_ERROR = 2


def split_args(argv: Sequence[str], default_config: str | None) -> tuple[str | None, list[str]]:
    """Split `[CONFIG] [key=value ...]` into the config path and the overrides."""
    args = list(argv)
    first = args[0] if args else None
    if first is not None and "=" not in first:
        return first, args[1:]
    return default_config, args


def run_settings(*sections: str) -> Callable[[], str]:
    """--help's table of a run config's keys (those under `sections`, when given)."""
    from .config import Config
    from .typed import settings_help

    return lambda: settings_help(Config, sections)


def run_cli(main: Callable[[list[str]], None], argv: Sequence[str] | None = None) -> None:
    """Run `main`; a UserError, or a failure of the user's disk (read-only, no permission, full,
    a file where a folder belongs), becomes one line on stderr and exit status 2, no traceback.
    Every command goes through here, so no command needs its own try/except for the disk."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print((main.__doc__ or "").strip())
        settings = getattr(main, "settings", None)  # a command's table of keys, from the config dataclasses
        if settings is not None:
            print("\n" + settings())
        return
    try:
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
