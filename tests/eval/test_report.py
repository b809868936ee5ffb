"""Report tables: intervals shown the way they were computed, the best method marked only when it is unique."""

from __future__ import annotations

import math

import pandas as pd

from blendexp.eval.metrics import Estimate
from blendexp.eval.report import markdown_table, summary_frame
from blendexp.eval.suite import EvalSet, SuiteResult


def _result(summary: dict[str, dict[str, Estimate]]) -> SuiteResult:
    """A result with only summaries (what the tables read)."""
    counts = {m: {"images": 4, "missing": 1 if m == "ext" else 0} for m in summary}
    return SuiteResult(EvalSet([], []), pd.DataFrame(), {}, summary, counts)


def test_table_marks_the_unique_best_and_formats_intervals() -> None:
    nan = Estimate(math.nan, math.nan, math.nan, 0)
    result = _result({
        "arc2face": {"id_sim": Estimate(0.80, 0.78, 0.82, 4), "exp_mae": Estimate(0.5, 0.4, 0.6, 4),
                     "fid": Estimate(12.0, 11.0, 15.0, 4)},
        "ext": {"id_sim": Estimate(0.80, 0.79, 0.81, 4), "exp_mae": Estimate(0.3, 0.2, 0.4, 4), "fid": nan},
    })
    table = markdown_table(result).splitlines()
    assert table[0] == "| method | images | ID sim (ArcFace) ↑ | expr MAE ↓ | FID ↓ |"
    assert table[2] == "| arc2face | 4 | 0.800 ± 0.020 | 0.500 ± 0.100 | 12.000 [11.000, 15.000] |"  # ID sim tie: no bold
    assert table[3] == "| ext | 4 (1 missing) | 0.800 ± 0.010 | **0.300 ± 0.100** | – |"
    frame = summary_frame(result).set_index("method")
    assert frame.loc["arc2face", "fid_high"] == 15.0 and frame.loc["ext", "missing"] == 1
