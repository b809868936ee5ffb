"""Every entry point starts fast: ``--help`` and ``--cfg job`` compose without importing torch, Lightning, diffusers
or transformers (they load after composition, inside the commands), and each ``python -m`` module has its console
script."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

HYDRA_ENTRY_POINTS = ["blendexp.train", "blendexp.evaluate", "blendexp.generate", "blendexp.demo",
                      "blendexp.controllability", "blendexp.data.build"]
ARGPARSE_ENTRY_POINTS = ["blendexp.report", "blendexp.toyworld.shards", "blendexp.models.tiny",
                         "blendexp.models.full_size", "blendexp.toyworld.assets"]
HEAVY = ("torch", "lightning", "diffusers", "transformers")
# Runs the module as `python -m` does, then reports (at exit, also after argparse's SystemExit) the heavy libraries
# that were imported.
PROBE = ("import atexit, runpy, sys\n"
         "atexit.register(lambda: print('HEAVY=' + ','.join(m for m in {heavy!r} if m in sys.modules)))\n"
         "sys.argv = [{module!r}, *{args!r}]\n"
         "runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")


def probe(module: str, *args: str, cwd: Path = REPO) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``python -m module args`` and return the process and the heavy libraries it imported."""
    code = PROBE.format(heavy=HEAVY, module=module, args=list(args))
    res = subprocess.run([sys.executable, "-c", code], cwd=cwd, text=True, capture_output=True, timeout=300)
    marker = [line for line in res.stdout.splitlines() if line.startswith("HEAVY=")]
    assert marker, f"{module} {args}: no report\n{res.stdout}\n{res.stderr}"
    return res, [m for m in marker[-1].removeprefix("HEAVY=").split(",") if m]


@pytest.mark.parametrize("module", HYDRA_ENTRY_POINTS)
@pytest.mark.parametrize("flag", ["--cfg job", "--help"])
def test_hydra_entry_point_composes_without_heavy_imports(module: str, flag: str) -> None:
    res, heavy = probe(module, *flag.split())
    assert res.returncode == 0, res.stderr
    assert heavy == [], f"`python -m {module} {flag}` imported {heavy} before composing"
    assert ("task_name:" if flag == "--cfg job" else "Powered by Hydra") in res.stdout


@pytest.mark.parametrize("module", ARGPARSE_ENTRY_POINTS)
def test_cli_help_without_heavy_imports(module: str) -> None:
    res, heavy = probe(module, "--help")
    assert res.returncode == 0, res.stderr
    assert heavy == [], f"`python -m {module} --help` imported {heavy}"
    assert "usage:" in res.stdout


def console_scripts() -> dict[str, str]:
    """``[project.scripts]`` of pyproject.toml: command name -> ``module:function``."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_entry_point_has_a_console_script() -> None:
    modules = {target.split(":")[0] for target in console_scripts().values()}
    assert modules == set(HYDRA_ENTRY_POINTS + ARGPARSE_ENTRY_POINTS)
    assert all(name.startswith("blendexp-") for name in console_scripts())


@pytest.mark.parametrize("name", ["blendexp-train", "blendexp-report"])
def test_console_script_runs(name: str, tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / name
    assert exe.is_file(), f"{exe} missing: run `uv sync --extra test` after editing [project.scripts]"
    res = subprocess.run([str(exe), "--help"], cwd=tmp_path, text=True, capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert ("train is powered by Hydra" if name == "blendexp-train" else "usage: blendexp-report") in res.stdout
