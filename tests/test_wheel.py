"""The package as a user installs it: the built wheel in a fresh virtual environment, run from an unrelated folder.
It composes the main job's config from the packaged configs, trains 5 steps with the embedded default pointed at by
``paths.data``, and without it names what is missing. The project's installed dependencies are made visible to the
fresh environment through a .pth file, so nothing is downloaded."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow
SOURCES = ("pyproject.toml", "README.md", "blendexp")  # what the wheel is built from (a copy: no build/ in the repo)


def run(cmd: list[str | Path], cwd: Path, timeout: int = 900, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess:
    """Run a command as a user would and capture its output."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0", **(env or {})}
    env.pop("BLENDEXP_ROOT", None)
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, text=True, capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with only the built blendexp wheel installed (its bin/ folder), dependencies from the project's."""
    uv = shutil.which("uv")
    assert uv, "uv must be on PATH (the README installs with it)"
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    built = run([uv, "build", "--wheel", "--no-build-isolation", "--python", sys.executable, "--out-dir",
                 root / "dist", src], cwd=root)
    assert built.returncode == 0, built.stderr
    wheel, = (root / "dist").glob("blendexp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "blendexp/conf/train.yaml" in names and "blendexp/conf/model/expr_adapter.yaml" in names
    assert not any(n.startswith(("data/", "tests/")) for n in names)
    venv = root / "venv"
    made = run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip()
    Path(site, "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = run([uv, "pip", "install", "--offline", "--no-deps", "--python", python, wheel], cwd=root)
    assert done.returncode == 0, done.stderr
    where = run([python, "-c", "import blendexp; print(blendexp.__file__)"], cwd=root)
    assert where.stdout.strip().startswith(site), f"blendexp imported from {where.stdout} instead of the wheel"
    return venv / "bin"


def test_wheel_composes_the_main_job_from_an_unrelated_folder(installed: Path, tmp_path: Path) -> None:
    res = run([installed / "blendexp-train", "+experiment=expr_adapter", "--cfg", "job", "--resolve"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "_target_: blendexp.modules.expression.ExpressionAdapterModule" in res.stdout
    assert f"outputs: {tmp_path.resolve()}/outputs" in res.stdout  # a wheel writes where it runs, not site-packages


def test_wheel_trains_five_steps_from_an_unrelated_folder(installed: Path, tmp_path: Path) -> None:
    res = run([installed / "blendexp-train", "+experiment=expr_adapter", f"paths.data={REPO}/data",
               "trainer.max_steps=5", "data.num_workers=0", "callbacks.samples.every_n_steps=1000", "run_name=five"],
              cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "blendexp: finished at step 5" in res.stdout
    run_dir = tmp_path / "outputs" / "expr_adapter" / "five"
    assert (run_dir / "result.json").is_file() and any((run_dir / "export").rglob("exp_adapter.*"))


def test_wheel_without_the_embedded_data_names_what_is_missing(installed: Path, tmp_path: Path) -> None:
    res = run([installed / "blendexp-train", "+experiment=expr_adapter", "trainer.max_steps=1"], cwd=tmp_path)
    assert res.returncode == 1
    assert f"paths.data={tmp_path.resolve()}/data does not exist" in res.stdout + res.stderr
    assert "BLENDEXP_ROOT" in res.stdout + res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: data.sources.stills.shards")
