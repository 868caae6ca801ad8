"""One-line errors for the command-line tools."""
import functools
import sys


class KitError(Exception):
    """A problem with the user's input, reported as one line naming the file."""


EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def cli(main):
    """Run ``main``; turn KitError into ``error: ...`` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except KitError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper
