"""Parsing the command line: a group whose parsing errors read like every other ftaudit error, a number type, a
revision type and a token type."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click
from click.exceptions import NoArgsIsHelpError

from ftaudit.errors import EXIT_ERROR
from ftaudit.renderers.markdown import workflow_error
from ftaudit.secrets import Redactor, clean_token, header_safe


class OneLineError(click.ClickException):
    """A bad command line (an invalid value, a missing argument, an unknown option or command), shown as one line
    with exit code 2, like every other error, instead of click's usage block."""

    exit_code = EXIT_ERROR

    def __init__(self, error: click.ClickException, github: bool) -> None:
        context = getattr(error, "ctx", None)
        hint = f" (see {context.command_path} --help)" if context is not None else ""
        super().__init__(error.format_message() + hint)
        self.github = github

    def show(self, file: object = None) -> None:
        message = Redactor.for_token(None)(self.format_message())
        click.echo(workflow_error(message) if self.github else f"ftaudit: error: {message}", err=True)


def _asks_github(args: Sequence[str]) -> bool:
    """Whether a command line, not yet parsed, ends up with `--format github` (the last --format counts, as click
    takes it): its own errors are then workflow commands, as every other error is with that format."""
    chosen = None
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--format" and i + 1 < len(args):
            chosen = args[i + 1]
        elif arg.startswith("--format="):
            chosen = arg.partition("=")[2]
    return chosen == "github"


_GITHUB = "ftaudit.github"
"""The context's meta key holding `_asks_github` of the whole command line."""


@contextmanager
def _one_line_errors(github: bool) -> Iterator[None]:
    try:
        yield
    except (OneLineError, NoArgsIsHelpError):  # a group run bare shows its help, as click does
        raise
    except click.ClickException as e:
        raise OneLineError(e, github) from None


class OneLineErrorGroup(click.Group):
    """The command group, parsing its own and its commands' options with `_one_line_errors`."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        github = _asks_github(args)  # before parsing, which consumes the list
        with _one_line_errors(github):
            context = super().make_context(info_name, args, parent, **extra)
        context.meta[_GITHUB] = github
        return context

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_errors(ctx.meta.get(_GITHUB, False)):
            return super().invoke(ctx)


class FiniteRange(click.FloatRange):
    """A float range that also refuses NaN and ±inf, which every comparison with a bound lets through."""

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        # click types FloatRange's input as a float: it is the option's text, or its default
        number = super().convert(value, param, ctx)  # type: ignore[arg-type]
        if not math.isfinite(number):
            self.fail(f"{value} is not a finite number.", param, ctx)
        return number


class Revision(click.ParamType):
    """A branch, tag or commit on the Hub, refused when empty (an unset variable in a script): the Hub resolves no such
    revision, while offline mode, and `--base-revision` for a declared base, would audit the default instead."""

    name = "revision"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if not str(value).strip():
            self.fail("empty: pass a branch, tag or commit, or leave the option out.", param, ctx)
        return str(value)


class Token(click.ParamType):
    """A Hugging Face token, cleaned as huggingface_hub cleans one from HF_TOKEN or the saved login (line breaks and
    surrounding spaces dropped; nothing left: no token, so the default applies), and refused, without being shown,
    when it holds a character that no HTTP header can carry."""

    name = "token"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> str | None:
        token = clean_token(str(value))
        if not header_safe(token):
            self.fail("holds a control or non-ASCII character, which no HTTP header can carry.", param, ctx)
        return token or None
