"""Real photos through the API and the generate command with default settings: faces are detected and aligned (not
taken as aligned crops), a photo without a face is refused naming the file, and toy instruments warn on real faces."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blendexp.generate import generate
from blendexp.errors import run_entry
from blendexp.pipeline import ExpressionPipeline, official_annotators
from tests.conftest import REPO
from tests.generate.conftest import compose_config

TOY_MODELS = REPO / "data" / "toy" / "models"
# The shipped toy ArcFace is the only trained recogniser here (no real weights can be downloaded). On these photos,
# measured once: detection (MTCNN, mesh-based FFHQ alignment) gives cosine 0.998 between the person and its
# 10-degree rotated copy, taking the photos as aligned crops gives 0.840; mean absolute difference of the two
# FFHQ-aligned 64 px faces 2.6, of the astronaut's gray and colour faces 4.4. Thresholds keep margins of at least
# 0.09 (cosine) and 4x (pixels); these are fixed models on fixed photos, no training involved.
MIN_ROTATED_COSINE = 0.9
MAX_ALIGNED_DIFF = 20.0


@pytest.fixture(scope="module")
def photo_pipe(pipe: ExpressionPipeline) -> ExpressionPipeline:
    """The session's tiny pipeline with the annotators the embedded default reads photos with (shipped toy ArcFace and
    SMIRK, detector ``auto``: MTCNN, as no SCRFD ships)."""
    return ExpressionPipeline(pipe.pipe, annotators=official_annotators(TOY_MODELS))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings."""
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_photos_are_detected_and_aligned_by_default(photo_pipe: ExpressionPipeline, real_photos: dict[str, Path],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="blendexp.pipeline"):
        person = photo_pipe.load_identity(real_photos["person"])
        rotated = photo_pipe.load_identity(str(real_photos["person_rotated"]))
    warnings = [r.getMessage() for r in caplog.records if "never trained on real faces" in r.getMessage()]
    assert len(warnings) == 1 and "toy world's ArcFace/SMIRK" in warnings[0]  # once per pipeline, naming the models
    assert cosine(person.embedding, rotated.embedding) >= MIN_ROTATED_COSINE
    assert person.image.shape == (64, 64, 3)  # FFHQ-aligned at the base's size from a 317 x 201 photo
    assert np.abs(person.image.astype(float) - rotated.image.astype(float)).mean() <= MAX_ALIGNED_DIFF
    declared = [photo_pipe.identity_from_image(real_photos[n], aligned=True) for n in ("person", "person_rotated")]
    assert cosine(*(d.embedding for d in declared)) < cosine(person.embedding, rotated.embedding)
    assert photo_pipe.expression_from_image(real_photos["astronaut"]).shape == (55,)
    rgb = np.asarray(Image.open(real_photos["astronaut"]))
    colour = photo_pipe.identity_from_image(rgb)
    rgba = photo_pipe.identity_from_image(np.asarray(Image.fromarray(rgb).convert("RGBA")))
    assert cosine(rgba.embedding, colour.embedding) >= MIN_ROTATED_COSINE
    huge = photo_pipe.identity_from_image(np.asarray(Image.fromarray(rgb).resize((6000, 6000))))  # 36 megapixels
    assert cosine(huge.embedding, colour.embedding) >= MIN_ROTATED_COSINE
    gray = photo_pipe.identity_from_image(np.asarray(Image.fromarray(rgb).convert("L")))  # found and aligned alike
    assert np.abs(gray.image.mean(axis=2) - colour.image.mean(axis=2)).mean() <= MAX_ALIGNED_DIFF
    reference = photo_pipe.reference_from_image(real_photos["person"])  # aligned at 512, identity re-extracted
    assert reference.image.shape == (64, 64, 3) and np.abs(reference.image.astype(float) - person.image).mean() < 1
    assert 0.9 < cosine(reference.embedding, person.embedding) < 1 - 1e-6  # another crop of the same face
    cat = real_photos["cat"]
    for read in (photo_pipe.load_identity, photo_pipe.expression_from_image, photo_pipe.reference_from_image):
        with pytest.raises(ValueError, match=f"no face found in {cat}"):
            read(cat)


def test_generate_reads_real_photos_with_default_settings(tmp_path: Path, real_photos: dict[str, Path],
                                                          capsys: pytest.CaptureFixture) -> None:
    """The README's own example, on the embedded default (shipped toy base and annotators), nothing but speed changed."""
    run = tmp_path / "run"
    files = generate(compose_config("generate", run, f"identity={real_photos['person']}",
                                    f"expression=[smile,{real_photos['astronaut']}]", "samples=1", "steps=2",
                                    "threads=1", "reference=true"))  # the official reference path, untrained LoRA
    settings = json.loads((run / "settings.json").read_text())
    assert settings["identity"] == str(real_photos["person"]) and list(settings["expressions"]) == ["smile", "astronaut"]
    assert len(settings["expressions"]["astronaut"]) > 10 and len(files["images"]) == 2
    grid = np.asarray(Image.open(run / "grid.png"))
    identity_cell = grid[2:66, 2:66]  # the first column: the identity's detected, aligned face
    assert identity_cell.std() > 10
    with pytest.raises(SystemExit) as exit_:
        run_entry(generate, compose_config("generate", tmp_path / "cat", f"identity={real_photos['cat']}", "steps=2"))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_.value.code == 1 and len(errors) == 1
    assert errors[0].startswith(f"error: no face found in {real_photos['cat']}")
