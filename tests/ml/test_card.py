"""What a person reads about a version (ml.card, pure): the approval form's evidence and the
model card, rendered from plain data and from a version's tags."""

from __future__ import annotations

import json

from ml.card import HISTORY_TAG, MAX_TEXT, evidence, history, model_card, with_event
from ml.gate import decide
from ml.settings import GateSettings

CANDIDATE = {"rmse": 1.0, "mae": 0.8, "r2": 0.98}
CHAMPION = {"rmse": 1.25, "mae": 0.9, "r2": 0.97}


def test_evidence_shows_deltas_bars_checks_drift_and_links():
    bars = GateSettings()
    decision = decide(CANDIDATE, CHAMPION, bars).to_dict()
    evaluation = {"candidate": CANDIDATE, "champion": CHAMPION, "champion_version": "4",
                  "holdout_rows": 1234}  # fmt: skip
    drift = {
        "scores": {"temperature_c": 0.31, "__target__": 0.02},
        "thresholds": {"temperature_c": 0.25, "__target__": 0.25},
        "when": "2026-03-10 01:00 UTC",
    }
    links = {
        "model_version": "http://mlflow/#/models/m/versions/5",
        "run": "http://mlflow/#/experiments/1/runs/r",
        "plots": [("residuals", "http://mlflow/get-artifact?path=plots/residuals.png&run_uuid=r")],
    }
    text = evidence(name="m", version="5", evaluation=evaluation, decision=decision,
                    bars=bars.model_dump(), drift=drift, links=links)  # fmt: skip
    assert "| RMSE (lower is better) | 1 | 1.25 | -0.25 (-20.0%) |" in text
    assert "| R² (higher is better) | 0.98 | 0.97 | +0.01 (+1.0%) |" in text
    assert "1234 rows" in text and "RMSE ≤ 3.0, R² ≥ 0.8" in text and "2.0% above" in text
    assert "- passed: no_regression: holdout RMSE 1 <= 1.275 (champion 1.25 + 2.0%)" in text
    # The most drifted column first, with its threshold.
    assert text.index("| `temperature_c` | **0.31** (above) | 0.25 |") < text.index(
        "| `__target__` | 0.02 | 0.25 |"
    )
    assert "[version v5](http://mlflow/#/models/m/versions/5)" in text
    assert "![residuals](http://mlflow/get-artifact?path=plots/residuals.png&run_uuid=r)" in text


def test_evidence_without_a_champion_or_a_drift_check():
    decision = decide(CANDIDATE, None, GateSettings()).to_dict()
    text = evidence(name="m", version="1", evaluation={"candidate": CANDIDATE}, decision=decision,
                    bars=GateSettings().model_dump(), drift=None, links={})  # fmt: skip
    assert "| metric | v1 |\n|---|---|\n| RMSE (lower is better) | 1 |" in text
    assert "no drift check has run" in text and "In MLflow" not in text


TAGS = {
    "airflow_dag_id": "train_and_deploy",
    "airflow_run_id": "scheduled__2026-03-10",
    "data_window_start": "2026-03-03",
    "data_window_end": "2026-03-10",
    "data_digest": "ab" * 32,
    "code_version": "1a2b3c",
    "gate.passed": "true",
    "gate.summary": "approved: all 3 checks passed",
    "holdout_rmse": "1",
    "holdout_mae": "0.8",
    "holdout_r2": "0.98",
    "champion_holdout_rmse": "1.25",
    "champion_holdout_mae": "0.9",
    "champion_holdout_r2": "0.97",
    "champion_version_at_eval": "4",
}


def test_the_model_card_says_window_code_gate_approval_and_history():
    tags = {
        **TAGS,
        "approval": "approved",
        "approval.by": "dana",
        "approval.via": "airflow",
        "approval.at": "2026-03-10T02:30:00Z",
        "approval.reason": "plots look right",
    }
    tags[HISTORY_TAG] = with_event(tags, "2026-03-10 02:31", "live", "on local: nightly")
    tags[HISTORY_TAG] = with_event(tags, "2026-03-11 02:31", "stopped serving", "replaced by v6")
    card = model_card("m", "5", tags, "run-1")
    assert card.startswith("### m v5")
    assert "`train_and_deploy` run `scheduled__2026-03-10`" in card and "`run-1`" in card
    assert "| data window | 2026-03-03 .. 2026-03-10 (end exclusive) |" in card
    assert f"`{'ab' * 8}`" in card and "`1a2b3c`" in card
    assert "**Gate**: passed: approved: all 3 checks passed" in card
    assert "| RMSE (lower is better) | 1 | 1.25 | -0.25 (-20.0%) |" in card
    assert "approved by dana via airflow at 2026-03-10T02:30:00Z: plots look right" in card
    assert card.endswith(
        "| 2026-03-10 02:31 | live | on local: nightly |\n"
        "| 2026-03-11 02:31 | stopped serving | replaced by v6 |"
    )


def test_the_card_of_a_version_from_a_notebook_waiting_for_approval():
    tags = {"gate.passed": "true", "approval.pending": json.dumps({"dag_id": "d"})}
    card = model_card("m", "7", tags)
    assert "outside the Airflow pipeline" in card and "waiting for a decision" in card
    assert card.endswith("**Rollout history**\n\nnot rolled out yet")
    forced = model_card("m", "7", {"gate.passed": "false", "force": "INC-7"})
    assert "**Gate**: rejected" in forced and "**Forced** (`force` tag): INC-7" in forced


def test_history_and_card_stay_within_what_mlflow_keeps():
    tags: dict[str, str] = dict(TAGS)
    for day in range(400):
        tags[HISTORY_TAG] = with_event(tags, f"day {day}", "live", "x" * 400)
    assert len(tags[HISTORY_TAG]) <= MAX_TEXT
    events = history(tags)
    assert events[-1][0] == "day 399" and len(events) < 400  # the oldest went first
    assert len(model_card("m", "5", tags)) <= MAX_TEXT
    assert history({HISTORY_TAG: "not json"}) == []
