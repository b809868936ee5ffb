"""Controllability sweeps: requested values over the component's range, the same seeds at every value, SMIRK's
re-measurement in the CSV, the fitted line and the plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from blendexp.controllability import controllability, fit_line, sweep_values
from tests.generate.conftest import compose_config, overrides


def test_sweep_writes_csv_plot_and_strip(tmp_path: Path, tiny_base, tiny_annotators: Path) -> None:
    out = tmp_path / "run"
    result = controllability(compose_config("controllability", out, *overrides(tiny_base, tiny_annotators),
                                            "component=eyelid.0", "points=3", "samples=2", "seed=7",
                                            "expression=smile"))
    frame = pd.read_csv(result["csv"])
    assert list(frame.columns) == ["component", "requested", "sample", "seed", "measured", "face"]
    assert frame["requested"].tolist() == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]  # the toy world's / SMIRK's eyelid range
    assert frame["seed"].tolist() == [7, 8] * 3 and frame["face"].all()
    assert frame["measured"].between(0, 1).all()  # SMIRK clamps eyelids to [0, 1]
    assert Image.open(result["plot"]).size[0] > 400
    assert Image.open(result["sweep"]).size == (2 + 3 * 66, 2 + 2 * 66)  # columns: values, rows: samples
    assert {"slope", "intercept", "pearson_r"} <= set(result)


def test_fit_line_and_ranges() -> None:
    x = np.linspace(0, 1, 5)
    assert fit_line(x, 2 * x + 1) == pytest.approx({"slope": 2.0, "intercept": 1.0, "pearson_r": 1.0})
    with_gap = fit_line(x, np.array([0.0, np.nan, 0.5, 0.75, 1.0]))  # images without a face are left out
    assert with_gap["slope"] == pytest.approx(1.0) and with_gap["pearson_r"] == pytest.approx(1.0)
    assert fit_line(x, np.zeros(5))["slope"] == 0.0  # an ignored component: a flat line
    np.testing.assert_allclose(sweep_values("jaw.0", None, 3), [0.0, 0.2, 0.4])
    np.testing.assert_allclose(sweep_values("exp.30", [-1, 1], 3), [-1.0, 0.0, 1.0])
    with pytest.raises(KeyError, match="unknown FLAME component 'jaw.3'"):
        sweep_values("jaw.3", None, 3)
    with pytest.raises(ValueError, match="points >= 2"):
        sweep_values("jaw.0", None, 1)
