"""The command line's argparse parts: one-line usage errors, boolean switches, trial flags.

:class:`Parser` raises :class:`UsageError` instead of printing and exiting, so ``wavesweep.cli``
reports a bad flag like every other misuse (one line, exit code 2); :func:`add_trial_options`
gives every ``TrialConfig`` field its flag. Nothing here prints.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from wavesweep.config import FIELD_HELP, TrialConfig


class UsageError(ValueError):
    """A command line argparse rejects (unknown flag, missing value): one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing the usage and exiting, so a
    bad flag is a one-line error like every other, with a "did you mean" for a mistyped flag,
    and a run ``mlflow run`` created gets the error tag."""

    def parse_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 (argparse's signature)
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            # Suggest only flags of the command given (`trial --nosuch` must not suggest `results --out`).
            subs = self._subparsers._group_actions[0].choices if self._subparsers else {}
            chosen = subs.get(getattr(ns, "command", None))
            flags = [o for p in (self, chosen) if p is not None for a in p._actions for o in a.option_strings if o.startswith("--")]
            self.error(f"unrecognized arguments: {' '.join(extras)}", flags=flags)
        return ns

    def error(self, message: str, flags: list[str] | None = None) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments: ") and flags:
            import difflib

            for word in message[len("unrecognized arguments: "):].split():
                close = difflib.get_close_matches(word.split("=", 1)[0], sorted(set(flags)), n=1)
                if word.startswith("-") and close:
                    message += f" (did you mean {close[0]}?)"
                    break
        sub = self.prog.split(" ", 1)[1] if " " in self.prog else ""  # "wavesweep study" -> "study"
        raise UsageError(f"{sub}: {message}" if sub else message)


class _BoolFlag(argparse.Action):
    """``--flag`` / ``--no-flag`` (argparse.BooleanOptionalAction's switches) that also accept an
    explicit value, ``--flag true`` / ``--flag=false``, as MLproject commands pass them."""

    def __init__(self, option_strings, dest, **kwargs):  # noqa: ANN001 (argparse's signature)
        opts = list(option_strings) + [o.replace("--", "--no-", 1) for o in option_strings]
        super().__init__(opts, dest, nargs="?", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        if option_string and option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"{option_string} takes no value (got {values!r})")
            values = "false"
        setattr(namespace, self.dest, "true" if values is None else values)

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def add_trial_options(p: argparse.ArgumentParser) -> None:
    """One flag per TrialConfig field (``eval_limit`` -> ``--eval-limit``), parsed as text and
    validated by TrialConfig itself, so MLproject ``-P`` values and flags obey the same rules.
    Boolean fields are switches (``--keep-approx``, ``--no-keep-approx``) that also take a value."""
    for f in fields(TrialConfig):
        if isinstance(f.default, bool):
            p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, action=_BoolFlag, metavar="BOOL",
                           help=f"{FIELD_HELP[f.name]} (default: {str(f.default).lower()})")  # fmt: skip
            continue
        p.add_argument(
            f"--{f.name.replace('_', '-')}", dest=f.name, default=None, metavar=type(f.default).__name__.upper(),
            help=f"{FIELD_HELP[f.name]} (default: {f.default!r})",
        )  # fmt: skip
