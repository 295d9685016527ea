"""The `ftaudit` command (and `python -m ftaudit`): the command line, once imported, run."""

import gc
import os
import sys

from ftaudit.errors import EXIT_ERROR


def entry() -> None:
    """Import the command line, with torch a second or more, then run it: Ctrl-C meanwhile ends the command as it
    does later, with one line and exit code 2, not a traceback of the imports.

    The imports make hundreds of thousands of objects that live as long as the process, and no garbage: the
    collector stays off while they run (its hundreds of passes took a tenth of the start-up), and what they made
    is then frozen, out of every later pass."""
    gc.disable()
    try:
        from ftaudit.cli import run
    except KeyboardInterrupt:
        print("ftaudit: error: interrupted", file=sys.stderr, flush=True)
        os._exit(EXIT_ERROR)
    gc.freeze()
    gc.enable()
    run()


if __name__ == "__main__":
    entry()
