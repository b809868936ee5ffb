"""Shared pieces for the generation tests: a trained-like adapter, one pipeline per session, composed configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from blendexp.config import CONF_DIR  # also registers the ${blendexp.*} resolvers
from blendexp.models.arc2face import Arc2FaceBase
from blendexp.models.expression_adapter import attach_expression_adapter, save_expression_adapter
from blendexp.pipeline import ExpressionPipeline
from tests.conftest import REPO
from tests.faces.conftest import single_torch_thread  # noqa: F401  (autouse: one torch thread for these tests too)

SAMPLE_SHARD = REPO / "data" / "sample" / "val-000000.tar"


@pytest.fixture(scope="session")
def tiny_annotators(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder for the tiny random ArcFace / SMIRK (written on first use by the code under test)."""
    return tmp_path_factory.mktemp("tiny-annotators")


@pytest.fixture(scope="session")
def exp_adapter(tiny_base, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Expression Adapter perturbed as training would (so expressions change images), exported officially."""
    base = Arc2FaceBase.from_pretrained(*tiny_base)
    torch.manual_seed(0)
    for p in attach_expression_adapter(base.unet):
        p.data.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("exp_adapter")
    save_expression_adapter(base.unet, folder)
    return folder


@pytest.fixture(scope="session")
def pipe(tiny_base, exp_adapter: Path, tiny_annotators: Path) -> ExpressionPipeline:
    """The API on the tiny base with the trained-like adapter and the tiny annotators (toy faces: aligned crops)."""
    return ExpressionPipeline.from_pretrained(*tiny_base, expression_adapter=exp_adapter,
                                              annotators={"tiny_root": str(tiny_annotators), "aligned": True})


@pytest.fixture(scope="session")
def face_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy face of the shipped sample shards as a PNG photo (FFHQ-aligned, 64 px)."""
    from blendexp.data.image_sets import read_images

    path = tmp_path_factory.mktemp("faces") / "toy_face.png"
    Image.fromarray(read_images(SAMPLE_SHARD, "face", [], limit=1)[0].image).save(path)
    return path


@pytest.fixture(scope="session")
def real_photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real photos no model here was trained on: one person cut (not square) from insightface's group photo t1.jpg,
    its copy rotated by 10 degrees, scikit-image's astronaut, and chelsea the cat (no human face)."""
    import cv2
    import insightface
    from skimage.data import astronaut, chelsea

    folder = tmp_path_factory.mktemp("photos")
    group = cv2.imread(str(Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"))
    person = np.ascontiguousarray(group[219:536, 692:893, ::-1])  # 317 x 201 around one face, as RGB
    turn = cv2.getRotationMatrix2D((person.shape[1] / 2, person.shape[0] / 2), 10, 1.0)
    rotated = cv2.warpAffine(person, turn, person.shape[1::-1], borderMode=cv2.BORDER_REFLECT)
    images = {"person.jpg": person, "person_rotated.jpg": rotated, "astronaut.png": astronaut(), "cat.png": chelsea()}
    for name, image in images.items():
        Image.fromarray(image).save(folder / name, quality=95)
    return {Path(name).stem: folder / name for name in images}


@pytest.fixture
def blank_png(tmp_path: Path) -> Path:
    """A grey picture without any face."""
    path = tmp_path / "blank.png"
    Image.fromarray(np.full((128, 128, 3), 128, np.uint8)).save(path)
    return path


def overrides(tiny_base, tiny_annotators: Path) -> list[str]:
    """Shrinks the embedded default for tests (2 steps, one thread) and points it at the session's tiny files."""
    return [f"paths.tiny_base={tiny_base[0].parent}", f"pipeline.annotators.tiny_root={tiny_annotators}",
            "threads=1", "steps=2"]


def compose_config(name: str, out: Path, *extra: str) -> DictConfig:
    """The real ``name`` config writing to ``out``, as the command composes it with these overrides."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=[f"out_dir={out}", *extra])
