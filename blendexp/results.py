"""``result.json``: what one training job says about itself (status, metrics, overrides, error, its process),
written atomically by the job (``blendexp/job.py``) and read at any time by the sweep report.

A job killed without a word (kill -9, the OOM killer) leaves "running" behind. Whoever finds such a record with its
process gone marks it "interrupted": the sweep report, and the job resuming the run, which keeps every earlier
attempt of the run under ``attempts``. Kept free of Lightning so a report loads fast.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"
ATTEMPT_FIELDS = ("status", "started", "updated", "host", "pid", "error")
PROCESS = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


def process_gone(record: dict[str, Any]) -> bool:
    """True when the record's process is known to have ended (on another host it cannot be told: False)."""
    if record.get("host") != PROCESS["host"] or not record.get("pid"):
        return False
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def is_this_process(record: dict[str, Any]) -> bool:
    """Whether this process wrote the record (a pid alone may be reused by a later attempt)."""
    return all(record.get(k) == v for k, v in PROCESS.items())


def read_result(path: Path) -> dict[str, Any] | None:
    """The record at ``path`` (None if there is none); "running" with its process gone is marked "interrupted",
    on disk too."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("status") == "running" and not is_this_process(record) and process_gone(record):
        record["status"] = "interrupted"
        write_json(path, record)
    return record


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` atomically: a reader (or a killed writer) never leaves half a file; the temporary name is
    this process's, so processes writing the same file at once (array parts) do not collide."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, record: dict[str, Any]) -> None:
    """``record`` as JSON, written atomically."""
    write_atomic(path, json.dumps(record, indent=2, default=str, allow_nan=False))


def record_attempt(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Write this process's ``record``, keeping earlier attempts (other processes) of the run under ``attempts``."""
    previous = read_result(path) or {}
    attempts = list(previous.get("attempts", []))
    if previous and not is_this_process(previous):
        attempts.append({k: previous.get(k) for k in ATTEMPT_FIELDS})
    record = {**record, **PROCESS, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "attempts": attempts}
    write_json(path, record)
    return record
