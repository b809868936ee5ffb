"""The one error-to-one-line wrapper every entry point runs in: a user error is one line on stderr and exit status 1.

A user error is bad input (a missing or unreadable file, a value out of range, a refused checkpoint), also when it
reaches us wrapped by Hydra's ``instantiate`` or re-raised from a DataLoader worker; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import logging
import pickle
import re
import sys
from typing import Any, Callable

log = logging.getLogger(__name__)
USER_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, KeyError,
    FloatingPointError, pickle.UnpicklingError)
WORKER_TRACEBACK = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


def _one_line(text: str) -> str:
    """A multi-line explanation (e.g. an expected folder layout) folded into one line."""
    return " ".join(text.split())


def _cause(err: BaseException) -> BaseException | None:
    """The exception Hydra's ``instantiate`` wrapped, if any (its own message is a repr with literal ``\\n``)."""
    from hydra.errors import InstantiationException

    return err.__cause__ if isinstance(err, InstantiationException) else None


def user_message(err: BaseException) -> str | None:
    """The one line a user sees for a user error (where it happened, what was wrong); None for a bug."""
    cause = _cause(err)
    if cause is not None:
        inner = user_message(cause)
        key = re.search(r"full_key: (\S+)", str(err))
        return None if inner is None else (f"{key.group(1)}: {inner}" if key else inner)
    if not isinstance(err, USER_ERRORS):
        return None
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if WORKER_TRACEBACK.match(text):  # re-raised from a loader worker: the original message is the last line
        text = re.sub(r"^[\w.]+: ", "", text.rstrip().splitlines()[-1])
    return _one_line(text)


def run_entry(command: Callable[[Any], Any], cfg: Any, on_error: Callable[[BaseException], bool] | None = None
              ) -> Any:
    """Run an entry point's command; a user error becomes one line on stderr and exit status 1, a bug re-raises.

    ``on_error`` sees every failure first (e.g. to record it); returning True means it was handled (a sweep's job
    that fails is recorded and the sweep goes on) and ``run_entry`` returns None."""
    try:
        return command(cfg)
    except Exception as err:
        if on_error is not None and on_error(err):
            return None
        message = user_message(err)
        if message is None:
            raise
        log.error("%s: %s", type(err).__name__, err)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
