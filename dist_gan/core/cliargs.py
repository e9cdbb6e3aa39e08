"""Command-line flags checked before ``fire`` sees them: an unknown flag or a value of the wrong type
is one line naming the flag (with a "did you mean"), not fire's bare usage screen or a traceback
from deep inside the command."""

from __future__ import annotations

import difflib
import inspect
import math
import sys
import types
import typing
from typing import Any, Callable

_EMPTY = ("none", "null")


def _expected(hint: Any) -> tuple[type | None, bool]:
    """(int, float, bool or None for anything else; whether None is allowed) of an annotation."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0] if len(args) == 1 else None
    return (hint if hint in (int, float, bool) else None), optional


def _value_problem(value: str | None, hint: Any) -> str | None:
    kind, optional = _expected(hint)
    if value is None:
        return None if kind in (bool, None) else "needs a value"
    if optional and value.lower() in _EMPTY:
        return None
    try:
        if kind is int:
            int(value)
        elif kind is float and not math.isfinite(float(value)):
            return "must be a finite number"
        elif kind is bool and value.lower() not in ("true", "false", "1", "0"):
            return "must be true or false"
    except ValueError:
        return "must be a whole number" if kind is int else "must be a number"
    return None


def flag_problem(command: Callable, argv: list[str]) -> str | None:
    """The first problem with ``argv``'s ``--flags`` for ``command``'s signature, or None."""
    signature = inspect.signature(command)
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return None  # takes anything (train: config keys, checked by the config loader)
    hints = typing.get_type_hints(command)
    names = list(signature.parameters)
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("--") or token in ("--help", "--"):
            continue
        name, has_value, given = token[2:].partition("=")
        value: str | None = given
        name = name.replace("-", "_")
        if name not in names:
            if name.startswith("no") and hints.get(name[2:]) is bool:
                continue  # fire's --noflag
            close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
            hint = f"; did you mean --{close[0]}?" if close else f"; options: {', '.join('--' + n for n in names)}"
            return f"unknown option --{name}{hint}"
        if not has_value:
            takes_value = _expected(hints.get(name))[0] is not bool
            value = argv[i] if takes_value and i < len(argv) and not argv[i].startswith("--") else None
            i += value is not None
        problem = _value_problem(value, hints.get(name))
        if problem:
            return f"--{name}={value!r} {problem}" if value is not None else f"--{name} {problem}"
    return None


def run_command(command: Callable, prog: str, argv: list[str] | None = None) -> None:
    """Check ``argv`` (default: the process's arguments) against ``command``, then hand it to fire."""
    import fire

    argv = sys.argv[1:] if argv is None else argv
    problem = flag_problem(command, argv)
    if problem:
        sys.exit(f"{prog}: error: {problem}")
    fire.Fire(command, command=argv, name=prog.split()[-1])
