"""The command line's exits: one line per error and the usual codes, with cleanup on every path."""

from __future__ import annotations

import sys

from tailseed.pipeline.errors import UserError


class Terminated(Exception):
    """SIGTERM, raised in the main thread so that cleanup runs as for Ctrl-C."""


def guarded(command: str, func, args) -> int:
    """Run a command's function with the usual exits: a UserError is one line and 2, Ctrl-C 130,
    SIGTERM 143, a full disk one line naming the file and 2; cleanup (temp files, the folder's
    lock, Ray) runs in each case."""
    import errno
    import signal

    def on_term(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        return int(func(args) or 0)
    except UserError as exc:
        print(f"tailseed {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tailseed {command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Terminated:
        print(f"tailseed {command}: terminated; rerun the same command to resume", file=sys.stderr)
        return 143
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        where = exc.filename or "the output folder"
        print(
            f"tailseed {command}: error: no space left on the device while writing {where}; "
            f"free some space and rerun the same command to resume",
            file=sys.stderr,
        )
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
