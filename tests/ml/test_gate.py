"""The gate's decision table: bars, regression allowance, NaN, force_deploy."""

from __future__ import annotations

import json
import math

import pytest

from ml.gate import Check, Decision, decide
from ml.settings import GateSettings

BARS = GateSettings(max_rmse=3.0, min_r2=0.8, max_regression=0.02, force_deploy=False)
FORCED = BARS.model_copy(update={"force_deploy": True})


def m(rmse: float, r2: float = 0.9, mae: float = 0.8) -> dict[str, float]:
    return {"rmse": rmse, "mae": mae, "r2": r2}


CHAMPION = m(1.00)

# (id, candidate, champion, settings, passed, forced, failed check names)
CASES = [
    ("first run, no champion, within bars", m(1.5), None, BARS, True, False, []),
    ("rmse over the bar", m(3.5), None, BARS, False, False, ["max_rmse"]),
    ("r2 under the bar", m(1.5, r2=0.5), None, BARS, False, False, ["min_r2"]),
    ("both bars fail", m(4.0, r2=0.1), None, BARS, False, False, ["max_rmse", "min_r2"]),
    ("regression beyond allowance", m(1.05), CHAMPION, BARS, False, False, ["no_regression"]),
    ("regression within allowance", m(1.015), CHAMPION, BARS, True, False, []),
    ("regression exactly at allowance", m(1.02), CHAMPION, BARS, True, False, []),
    ("improvement", m(0.8, r2=0.95), CHAMPION, BARS, True, False, []),
    ("nan rmse, no champion", m(math.nan), None, BARS, False, False, ["max_rmse"]),
    (
        "nan rmse vs champion",
        m(math.nan),
        CHAMPION,
        BARS,
        False,
        False,
        ["max_rmse", "no_regression"],
    ),
    ("inf rmse", m(math.inf), None, BARS, False, False, ["max_rmse"]),
    ("nan r2", m(1.0, r2=math.nan), None, BARS, False, False, ["min_r2"]),
    ("nan champion rmse", m(1.0), m(math.nan), BARS, False, False, ["no_regression"]),
    ("force past a regression", m(1.5), CHAMPION, FORCED, True, True, ["no_regression"]),
    ("force past the bars", m(4.0, r2=0.1), None, FORCED, True, True, ["max_rmse", "min_r2"]),
    ("force with nothing to force", m(0.9), CHAMPION, FORCED, True, False, []),
]


@pytest.mark.parametrize(
    ("candidate", "champion", "settings", "passed", "forced", "failed"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_decision_table(candidate, champion, settings, passed, forced, failed):
    decision = decide(candidate, champion, settings)

    assert decision.passed is passed
    assert decision.forced is forced
    assert decision.has_champion is (champion is not None)
    assert [c.name for c in decision.checks] == ["max_rmse", "min_r2", "no_regression"]
    assert [c.name for c in decision.checks if not c.passed] == failed
    # Reasons are kept even when forced past, one per failed check.
    assert len(decision.reasons) == len(failed)
    verdict = "forced past" if forced else "approved" if passed else "rejected"
    assert decision.summary().startswith(verdict + ":")


def test_no_champion_check_says_so():
    decision = decide(m(1.0), None, BARS)
    check = {c.name: c for c in decision.checks}["no_regression"]
    assert check.passed
    assert check.detail == "no champion yet: only absolute bars apply"


def test_details_name_values_and_bars():
    decision = decide(m(3.5), None, BARS)
    assert decision.reasons == ["holdout RMSE 3.5 > bar 3"]
    decision = decide(m(1.1), CHAMPION, BARS)
    assert "1.1 > 1.02" in decision.reasons[0]
    assert "10.0% worse" in decision.reasons[0]


@pytest.mark.parametrize(
    ("candidate", "champion"),
    [
        pytest.param({"rmse": 1.0, "r2": 0.9}, None, id="candidate lacks mae"),
        pytest.param({}, None, id="candidate empty"),
        pytest.param(m(1.0), {"rmse": 1.0}, id="champion lacks keys"),
        pytest.param({"rmse": "abc", "mae": 1.0, "r2": 0.9}, None, id="not a number"),
        pytest.param({"rmse": None, "mae": 1.0, "r2": 0.9}, None, id="None"),
    ],
)
def test_bad_metrics_raise_value_error(candidate, champion):
    with pytest.raises(ValueError, match=r"candidate|champion"):
        decide(candidate, champion, BARS)


@pytest.mark.parametrize(
    ("candidate", "champion", "settings"),
    [(m(1.0), None, BARS), (m(1.5), CHAMPION, FORCED), (m(math.nan), CHAMPION, BARS)],
)
def test_dict_roundtrip_through_json(candidate, champion, settings):
    decision = decide(candidate, champion, settings)
    payload = json.loads(json.dumps(decision.to_dict()))  # what XCom does to it

    assert Decision.from_dict(payload) == decision
    assert payload["summary"] == decision.summary()
    assert payload["reasons"] == decision.reasons


def test_to_tags_are_strings():
    decision = decide(m(1.5), CHAMPION, FORCED)
    tags = decision.to_tags()

    assert all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items())
    assert tags["gate.passed"] == "true"
    assert tags["gate.forced"] == "true"
    assert tags["gate.has_champion"] == "true"
    assert "no_regression" not in tags["gate.reasons"]  # the detail, not the name
    assert tags["gate.reasons"] == decision.reasons[0]
    assert [Check.from_dict(c) for c in json.loads(tags["gate.checks"])] == list(decision.checks)
    assert tags["gate.check.no_regression"].startswith("failed: ")
    assert tags["gate.check.max_rmse"].startswith("passed: ")


def test_to_tags_when_clean():
    tags = decide(m(1.0), None, BARS).to_tags()
    assert tags["gate.passed"] == "true"
    assert tags["gate.forced"] == "false"
    assert tags["gate.reasons"] == "none"
