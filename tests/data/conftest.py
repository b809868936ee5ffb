"""Shared inputs for the data tests: real photos, toy-world MP4 clips, tiny random annotators, build configs."""

from __future__ import annotations

import io
import shutil
import tarfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from skimage.data import astronaut

from blendexp.config import CONF_DIR
from blendexp.data.build import build
from blendexp.data.format import FaceSample, encode_sample, make_key
from blendexp.faces.annotators import ensure_tiny_annotators
from blendexp.flame import EXP_DIM, ID_DIM
from blendexp.toyworld.params import identity_rng, sample_identity
from blendexp.toyworld.video import make_clip, write_clip
from tests.conftest import single_torch_thread_fixture

INSIGHTFACE_IMAGES = Path(__import__("insightface").__file__).parent / "data" / "images"


single_torch_thread = single_torch_thread_fixture()


@pytest.fixture(scope="session")
def annotators(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with a tiny random ArcFace ONNX and SMIRK checkpoint in the official formats."""
    folder = tmp_path_factory.mktemp("annotators")
    ensure_tiny_annotators(folder, facenet=False)
    return folder


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real photos, one folder per subject: two single portraits, a group, a faceless image, a broken file and a
    thumbnail smaller than any face the builder accepts."""
    root = tmp_path_factory.mktemp("photos")
    for subject in ("eileen", "tom", "group", "nobody"):
        (root / subject).mkdir()
    cv2.imwrite(str(root / "eileen" / "astronaut.png"), astronaut()[:, :, ::-1])
    shutil.copy(INSIGHTFACE_IMAGES / "Tom_Hanks_54745.png", root / "tom" / "hanks.png")
    shutil.copy(INSIGHTFACE_IMAGES / "t1.jpg", root / "group" / "t1.jpg")
    shutil.copy(INSIGHTFACE_IMAGES / "mask_green.jpg", root / "nobody" / "mask.jpg")
    (root / "nobody" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    cv2.imwrite(str(root / "nobody" / "thumb.png"), cv2.resize(astronaut()[:, :, ::-1], (32, 32)))  # below min_size
    return root


@pytest.fixture(scope="session")
def toy_videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two toy subjects with one 12-frame 96 px MP4 clip each (plus ground truth), in subject folders."""
    root = tmp_path_factory.mktemp("videos")
    for subject in (1, 5):  # identities MTCNN finds in every frame
        rng = identity_rng(0, "stills", subject)  # the (0, subject) draws these subjects were picked from
        clip = make_clip(sample_identity(rng), rng, n_frames=12, size=96, nuisance_strength=0.2)
        write_clip(clip, root / f"s{subject}", "c00")
    return root


SMALL_SHARDS = ("shard.maxcount=2", "video.max_frames=12", "face.min_score=0.7")


def shard_bytes(out: Path) -> dict[str, bytes]:
    """Name → content of every finished shard in ``out``."""
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


@pytest.fixture(scope="package")
def reference_build(tmp_path_factory: pytest.TempPathFactory, toy_videos: Path, annotators: Path) -> Path:
    """An uninterrupted build in this process: 2 clips x 12 frames in shards of 2 samples."""
    out = tmp_path_factory.mktemp("reference")
    build(build_config(out, {"clips": toy_videos}, annotators, *SMALL_SHARDS))
    return out


@pytest.fixture(scope="package")
def reference(reference_build: Path) -> dict[str, bytes]:
    """The reference build's shards, by name."""
    shards = shard_bytes(reference_build)
    assert len(shards) == 12, sorted(shards)
    return shards


def build_config(out: Path, sources: dict[str, Path | str], annotators: Path, *overrides: str) -> DictConfig:
    """The real conf/build.yaml, pointed at test inputs, MTCNN and tiny annotators, run in this process."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("build", overrides=[
            f"out={out}", "num_workers=0", "face.detector=mtcnn", f"tiny_annotators={annotators}",
            "identity.path=null", "expression.smirk=null", "face.size=64", "face.min_size=24",
            *[f"+sources.{name}.inputs={path}" for name, path in sources.items()], *overrides])


def face_sample(source: str, subject: str, clip: str | None, frame: int, exp: np.ndarray | None = None,
                size: int = 16, latents: np.ndarray | None = None) -> FaceSample:
    """A small synthetic sample whose pixels, id and exp are derived from its key (fast shard fixtures)."""
    rng = np.random.default_rng(zlib.crc32(f"{source}/{subject}/{clip}/{frame}".encode()))
    exp = rng.standard_normal(EXP_DIM).astype(np.float32) if exp is None else exp
    meta = {"source": source, "subject": subject, "clip": clip, "frame": frame}
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return FaceSample(make_key(source, subject, clip or f"img{frame}", 0 if clip is None else frame), image,
                      rng.standard_normal(ID_DIM).astype(np.float32), exp, meta, latents)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with exactly these members in this order (lets tests inject malformed ones)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def members_of(sample: FaceSample, **replace: bytes | None) -> list[tuple[str, bytes]]:
    """Tar members of a sample as the shard contract encodes it; ``replace`` swaps (bytes) or drops (None) some."""
    encoded = encode_sample(sample)
    encoded.update(replace)
    return [(f"{sample.key}.{ext}", data) for ext, data in encoded.items() if ext != "__key__" and data is not None]
