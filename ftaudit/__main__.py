"""The `ftaudit` command (and `python -m ftaudit`): the command line, once imported, run."""

import os
import sys

from ftaudit.errors import EXIT_ERROR


def entry() -> None:
    """Import the command line, with torch a second or more, then run it: Ctrl-C meanwhile ends the command as it
    does later, with one line and exit code 2, not a traceback of the imports."""
    try:
        from ftaudit.cli import run
    except KeyboardInterrupt:
        print("ftaudit: error: interrupted", file=sys.stderr, flush=True)
        os._exit(EXIT_ERROR)
    run()


if __name__ == "__main__":
    entry()
