"""The toy-world renderer: determinism, sizes, framing, and that each expression component is local."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from blendexp.flame import COMPONENT_NAMES, EXP_DIM, EXPRESSION
from blendexp.toyworld.render import (
    IDENTITY_DIM,
    MAPPED_COMPONENTS,
    Identity,
    Nuisance,
    neutral_expression,
    region_masks,
    render_face,
    sample_expression,
    sample_identity,
    sample_nuisance,
)


def _face(seed: int, size: int = 128) -> np.ndarray:
    """Render identity, expression and nuisance all drawn from one seed."""
    rng = np.random.default_rng(seed)
    return np.asarray(render_face(sample_identity(rng), sample_expression(rng), sample_nuisance(rng), size))


def _with(index: int, value: float) -> np.ndarray:
    """Neutral expression with one component set."""
    exp = neutral_expression()
    exp[index] = value
    return exp


def test_same_seed_gives_identical_bytes_and_different_seeds_differ() -> None:
    a, b, c = _face(7), _face(7), _face(8)
    assert a.tobytes() == b.tobytes()
    assert np.abs(a.astype(int) - c).mean() > 5


@pytest.mark.parametrize("size", [64, 512])
def test_sizes_render_the_same_picture(size: int) -> None:
    rng = np.random.default_rng(3)
    identity, exp, nuisance = sample_identity(rng), sample_expression(rng), sample_nuisance(rng)
    img = render_face(identity, exp, nuisance, size)
    assert img.mode == "RGB" and img.size == (size, size)
    ref = np.asarray(render_face(identity, exp, nuisance, 128), dtype=np.float32)
    rescaled = cv2.resize(np.asarray(img), (128, 128), interpolation=cv2.INTER_AREA).astype(np.float32)
    assert np.abs(rescaled - ref).mean() < 4  # same geometry at every resolution, only sharper/blurrier


def test_face_is_framed_like_an_aligned_crop() -> None:
    """Eyelids change pixels near 40% height and the lips near 70%, centred, so alignment downstream is trivial."""
    identity = sample_identity(np.random.default_rng(0))
    base = np.asarray(render_face(identity, neutral_expression(), size=200)).astype(int)
    for index, value, y_expected in ((50, 1.0, 0.40), (51, 1.0, 0.40), (5, 3.0, 0.70)):
        changed = np.abs(np.asarray(render_face(identity, _with(index, value), size=200)) - base).max(-1) > 10
        ys, xs = np.nonzero(changed)
        assert abs(ys.mean() / 200 - y_expected) < 0.03, COMPONENT_NAMES[index]
    both_eyes = _with(50, 1.0) + _with(51, 1.0)
    xs = np.nonzero(np.abs(np.asarray(render_face(identity, both_eyes, size=200)) - base).max(-1) > 10)[1]
    assert abs(xs.mean() / 200 - 0.5) < 0.02


CASES = [(i, v) for i, c in MAPPED_COMPONENTS.items() for v in (c.low, c.high) if v != 0]


@pytest.mark.parametrize(("index", "value"), CASES, ids=[f"{COMPONENT_NAMES[i]}={v:g}" for i, v in CASES])
def test_component_changes_only_its_region(index: int, value: float) -> None:
    info = MAPPED_COMPONENTS[index]
    for seed in range(4):  # frontal and posed, several identities (hair styles, glasses)
        rng = np.random.default_rng(seed)
        identity = sample_identity(rng)
        nuisance = sample_nuisance(rng) if seed % 2 else Nuisance.none()
        base = np.asarray(render_face(identity, neutral_expression(), nuisance)).astype(int)
        moved = np.asarray(render_face(identity, _with(index, value), nuisance)).astype(int)
        region = region_masks(identity, 128, nuisance)[info.region]
        # Tolerance: a pixel counts as changed above 10/255 in some channel, and the region is dilated by
        # one pixel. Anti-aliasing and the box downsampling spread a moved edge into the neighbouring pixel
        # with a few levels of intensity, and the jaw/cheek falloffs have sub-pixel tails of 1-3 levels at
        # the region border; anything beyond that is a real leak. Measured: 0 leaked pixels over 40 faces.
        changed = np.abs(moved - base).max(-1) > 10
        grown = cv2.dilate(region.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        leaked = int((changed & ~grown).sum())
        assert leaked <= max(2, 0.01 * changed.sum()), f"{info.name}: {leaked} changed pixels outside {info.region}"
        assert (changed & region).sum() >= 15, f"{info.name} barely changes its region"
        assert region.mean() < 0.35, f"region {info.region} is too large to mean anything"


def test_regions_follow_the_pose() -> None:
    identity = sample_identity(np.random.default_rng(1))
    frontal = region_masks(identity, 128)["mouth"]
    shifted = region_masks(identity, 128, Nuisance(dx=0.1))["mouth"]
    assert np.nonzero(shifted)[1].mean() - np.nonzero(frontal)[1].mean() == pytest.approx(12.8, abs=0.5)


def test_out_of_range_values_are_clipped_to_the_documented_range() -> None:
    identity = sample_identity(np.random.default_rng(2))
    for index, info in MAPPED_COMPONENTS.items():
        beyond = np.asarray(render_face(identity, _with(index, info.high + 5), size=64))
        at_edge = np.asarray(render_face(identity, _with(index, info.high), size=64))
        assert beyond.tobytes() == at_edge.tobytes(), info.name


def test_unmapped_components_do_not_change_the_image() -> None:
    identity = sample_identity(np.random.default_rng(2))
    unmapped = [i for i in range(EXP_DIM) if i not in MAPPED_COMPONENTS]
    exp = neutral_expression()
    exp[unmapped] = 2.0
    neutral = np.asarray(render_face(identity, neutral_expression()))
    assert np.asarray(render_face(identity, exp)).tobytes() == neutral.tobytes()


def test_sample_expression_respects_smirk_ranges() -> None:
    rng = np.random.default_rng(0)
    exps = np.stack([sample_expression(rng) for _ in range(500)])
    assert exps.shape == (500, EXP_DIM) and exps.dtype == np.float32
    for index, info in MAPPED_COMPONENTS.items():
        col = exps[:, index]
        assert col.min() >= info.low and col.max() <= info.high, info.name
        assert (col != 0).mean() > 0.3, f"{info.name} is almost never sampled"
    unmapped = [i for i in range(EXP_DIM) if i not in MAPPED_COMPONENTS]
    assert not exps[:, unmapped].any()
    assert np.abs(exps[:, EXPRESSION]).max() <= 3.0
    assert np.abs(sample_expression(rng, scale=0.1)).max() <= 0.3 + 1e-6


def test_identities_differ_more_than_expressions() -> None:
    """A recogniser can only learn identities if the person changes the picture more than the expression."""
    ids = [sample_identity(np.random.default_rng(s)) for s in range(8)]
    exps = [sample_expression(np.random.default_rng(100 + s)) for s in range(8)]
    img = {(a, b): np.asarray(render_face(ids[a], exps[b], size=64)).astype(int) for a in range(8) for b in range(8)}
    between = [np.abs(img[a, a] - img[b, a]).mean() for a in range(8) for b in range(a + 1, 8)]
    within = [np.abs(img[a, a] - img[a, b]).mean() for a in range(8) for b in range(a + 1, 8)]
    # Expressions are large on purpose (the toy SMIRK must read them through a VAE), so the closest two people
    # differ by less than twice the largest expression; they still differ by more, and by far more on average.
    assert min(between) > max(within) and np.mean(between) > 5 * np.mean(within)
    assert len({i.hair_style for i in ids}) > 2 and len({i.glasses for i in ids}) > 1


def test_identity_and_nuisance_vectors_round_trip() -> None:
    rng = np.random.default_rng(5)
    identity, nuisance = sample_identity(rng), sample_nuisance(rng)
    vec = identity.to_vector()
    assert vec.shape == (IDENTITY_DIM,) and vec.dtype == np.float32
    assert Identity.from_vector(vec) == identity
    assert Nuisance.from_vector(nuisance.to_vector()).to_vector().tobytes() == nuisance.to_vector().tobytes()
    with pytest.raises(ValueError, match="identity vector"):
        Identity.from_vector(vec[:-1])


def test_zero_strength_nuisance_renders_like_none() -> None:
    identity = sample_identity(np.random.default_rng(4))
    quiet = sample_nuisance(np.random.default_rng(9), strength=0.0)
    exp = sample_expression(np.random.default_rng(4))
    assert np.asarray(render_face(identity, exp, quiet)).tobytes() == np.asarray(render_face(identity, exp)).tobytes()


def test_bad_expression_length_is_rejected() -> None:
    identity = sample_identity(np.random.default_rng(0))
    with pytest.raises(ValueError, match="55 values"):
        render_face(identity, np.zeros(50, dtype=np.float32))
