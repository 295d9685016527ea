"""Parsing the command line: a group whose parsing errors read like every other ftaudit error, a number type, a
revision type and a token type."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
from click.exceptions import NoArgsIsHelpError

from ftaudit.errors import EXIT_ERROR
from ftaudit.secrets import Redactor, clean_token, header_safe


class OneLineError(click.ClickException):
    """A bad command line (an invalid value, a missing argument, an unknown option or command), shown as one line
    with exit code 2, like every other error, instead of click's usage block."""

    exit_code = EXIT_ERROR

    def __init__(self, error: click.ClickException) -> None:
        context = getattr(error, "ctx", None)
        hint = f" (see {context.command_path} --help)" if context is not None else ""
        super().__init__(error.format_message() + hint)

    def show(self, file: object = None) -> None:
        click.echo(f"ftaudit: error: {Redactor.for_token(None)(self.format_message())}", err=True)


@contextmanager
def _one_line_errors() -> Iterator[None]:
    try:
        yield
    except (OneLineError, NoArgsIsHelpError):  # a group run bare shows its help, as click does
        raise
    except click.ClickException as e:
        raise OneLineError(e) from None


class OneLineErrorGroup(click.Group):
    """The command group, parsing its own and its commands' options with `_one_line_errors`."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with _one_line_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_errors():
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
