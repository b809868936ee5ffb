"""Where a requeued SLURM job resumes from: Lightning's hpc checkpoint, else last.ckpt, else what was configured."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from blendexp.job import resume_path


@pytest.mark.parametrize(("restarts", "configured", "hpc", "expected"), [
    ("0", None, True, None),                # first start: as configured (Lightning itself finds an hpc checkpoint)
    ("1", None, False, "last"),            # requeued without Lightning's checkpoint (preempted, node failure)
    ("1", None, True, None),                # requeued after USR1: Lightning resumes from hpc_ckpt_N.ckpt
    ("2", "/x/epoch.ckpt", True, "/x/epoch.ckpt"),  # an explicit ckpt_path always wins
])
def test_requeued_job_resumes_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restarts: str,
                                               configured: str | None, hpc: bool, expected: str | None) -> None:
    monkeypatch.setenv("SLURM_RESTART_COUNT", restarts)
    if hpc:
        (tmp_path / "hpc_ckpt_1.ckpt").touch()
    assert resume_path(configured, SimpleNamespace(default_root_dir=str(tmp_path))) == expected
