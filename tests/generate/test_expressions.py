"""Presets, edits, interpolation and expression parsing: the vectors every generation command starts from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from blendexp.flame import (
    EXP_DIM,
    MAPPED_COMPONENTS,
    apply_edits,
    component_index,
    component_range,
    describe,
    interpolate,
    load_presets,
    main_components,
    parse_expression,
    preset,
)


def test_presets_cover_the_basic_emotions_within_the_toy_worlds_ranges() -> None:
    presets = load_presets()
    assert {"neutral", "smile", "surprise", "anger", "sadness", "disgust", "fear", "left_wink", "right_wink"} <= set(presets)
    assert not presets["neutral"].any()
    for name, vec in presets.items():
        used = np.flatnonzero(vec)
        assert set(used) <= set(MAPPED_COMPONENTS), f"{name} uses components the toy world does not draw"
        for i in used:
            assert MAPPED_COMPONENTS[i].low <= vec[i] <= MAPPED_COMPONENTS[i].high, f"{name}: component {i} out of range"
    # "left" is the subject's left, as in FLAME: a left wink closes eyelid.0 only.
    assert presets["left_wink"][component_index("eyelid.0")] == 1.0
    assert presets["left_wink"][component_index("eyelid.1")] == 0.0
    assert presets["surprise"][component_index("jaw.0")] > 0


def test_unknown_preset_lists_every_preset() -> None:
    with pytest.raises(ValueError, match=r"unknown expression preset 'grin'; presets: neutral, smile, .*right_wink"):
        preset("grin")


def test_preset_returns_a_copy() -> None:
    preset("smile")[0] = 99.0
    assert preset("smile")[0] == 2.5


def test_edits_in_either_hydra_form_set_components() -> None:
    flat = apply_edits(preset("smile"), {"jaw.0": 0.3, "eyelid.1": 1})
    nested = apply_edits(preset("smile"), {"jaw": {"0": 0.3}, "eyelid": {"1": 1}})  # from +edits.jaw.0=0.3
    np.testing.assert_array_equal(flat, nested)
    assert describe(flat) == {"exp.0": 2.5, "exp.1": 2.5, "exp.7": 1.0, "eyelid.1": 1.0, "jaw.0": 0.3}
    with pytest.raises(ValueError, match="edits: unknown FLAME component 'jaw.7'"):
        apply_edits(preset("smile"), {"jaw.7": 0.1})


def test_interpolation_passes_through_every_keyframe() -> None:
    keys = [preset("neutral"), preset("smile"), preset("surprise")]
    path = interpolate(keys, 5)
    np.testing.assert_allclose(path[[0, 2, 4]], np.stack(keys))
    np.testing.assert_allclose(path[1], (keys[0] + keys[1]) / 2)
    smooth = interpolate(keys, 9, ease="smooth")
    np.testing.assert_allclose(smooth[[0, 4, 8]], np.stack(keys))
    quarter = smooth[1, component_index("exp.0")] / 2.5
    assert quarter == pytest.approx(0.15625)  # smoothstep(1/4): slow out of the keyframe
    with pytest.raises(ValueError, match="at least 2 keyframes"):
        interpolate(keys[:1], 4)
    with pytest.raises(ValueError, match="unknown easing"):
        interpolate(keys, 4, ease="bounce")


def test_parse_expression_reads_presets_flame_files_numbers_and_images(tmp_path: Path) -> None:
    named = tmp_path / "mine.json"
    named.write_text(json.dumps({"a": [0.1] * EXP_DIM, "b": [0.2] * EXP_DIM}))
    single = tmp_path / "one.npy"
    np.save(single, np.full(EXP_DIM, 0.3, np.float32))
    driving = tmp_path / "driver.png"
    driving.write_bytes(b"not read here")
    seen: list[Path] = []

    def smirk(path: Path) -> np.ndarray:
        seen.append(path)
        return np.full(EXP_DIM, 0.4, np.float32)

    out = parse_expression(["smile", str(named), str(single), str(driving), [0.5] * EXP_DIM], smirk)
    assert [n for n, _ in out] == ["smile", "mine-a", "mine-b", "one", "driver", "custom"]
    assert [float(e[3]) for _, e in out[1:]] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert seen == [driving]


def test_parse_expression_errors_name_the_problem(tmp_path: Path) -> None:
    short = tmp_path / "short.npy"
    np.save(short, np.zeros(54, np.float32))
    with pytest.raises(ValueError, match=f"FLAME vector in {short} has 54 values; 55 values are expected"):
        parse_expression(str(short))
    with pytest.raises(FileNotFoundError, match="FLAME file not found"):
        parse_expression(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="needs SMIRK"):
        (tmp_path / "x.png").write_bytes(b"")
        parse_expression(str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="not a FLAME file"):
        parse_expression(str(tmp_path / "notes.txt"))


def test_main_components_are_the_toy_worlds_with_their_ranges() -> None:
    assert main_components()[0] == "exp.0" and main_components()[-1] == "jaw.2" and len(main_components()) == 13
    assert component_range("jaw.0") == (0.0, 0.4)
    assert component_range("exp.20") == (-3.0, 3.0)
