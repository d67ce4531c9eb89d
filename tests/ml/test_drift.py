"""Drift scores on real synthetic partitions: zero for the same data, a retrain for a drifted
target, nothing for an ordinary week, and bad columns reported instead of crashing."""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest

from ml import drift
from ml.data import split_holdout
from ml.schema import SYNTHETIC_FEATURES
from ml.settings import DataSettings, DriftSettings
from ml.synthetic import synthetic_partition

# The champion's window ends (exclusive) here; the monitor looks at the 3 days after it.
TRAINED_UNTIL = date(2026, 11, 29)
SETTINGS = DriftSettings()


def days(first: date, n: int, data: DataSettings) -> pd.DataFrame:
    return pd.concat(
        [synthetic_partition(first + timedelta(days=i), data) for i in range(n)], ignore_index=True
    )


def as_scored(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.rename(columns={"target": drift.TARGET_KEY})


@pytest.fixture(scope="module")
def champion_profile() -> dict:
    """Profiled like the pipeline does: the holdout of the 7-day training window."""
    window = days(TRAINED_UNTIL - timedelta(days=7), 7, DataSettings())
    _, holdout = split_holdout(window, 0.2, 42)
    return drift.profile_frame(as_scored(holdout), [*SYNTHETIC_FEATURES, drift.TARGET_KEY])


def test_the_same_data_scores_zero(champion_profile):
    window = days(TRAINED_UNTIL - timedelta(days=7), 7, DataSettings())
    _, holdout = split_holdout(window, 0.2, 42)
    scores = drift.score_frame(champion_profile, as_scored(holdout))
    assert {s.psi for s in scores.values()} == {0.0}
    assert not drift.decide(scores, SETTINGS).drifted


def test_an_ordinary_next_few_days_do_not_call_for_a_retrain(champion_profile):
    newest = days(TRAINED_UNTIL, SETTINGS.window_days, DataSettings())
    scores = drift.score_frame(champion_profile, as_scored(newest))
    verdict = drift.decide(scores, SETTINGS)
    assert scores[drift.TARGET_KEY].psi < SETTINGS.target_psi
    assert not verdict.retrain, verdict.summary()


def test_a_drifted_target_calls_for_a_retrain_and_says_why(champion_profile):
    drifted = DataSettings(synthetic_drift_start=TRAINED_UNTIL, synthetic_drift_strength=1.0)
    newest = days(TRAINED_UNTIL, SETTINGS.window_days, drifted)
    verdict = drift.decide(drift.score_frame(champion_profile, as_scored(newest)), SETTINGS)
    assert verdict.retrain
    assert drift.TARGET_KEY in verdict.drifted
    assert verdict.drifted[drift.TARGET_KEY].startswith("PSI ")
    assert verdict.summary().startswith("retrain: ")


def test_feature_drift_is_reported_and_retrains_only_when_asked(champion_profile):
    shifted = as_scored(days(TRAINED_UNTIL, 3, DataSettings()))
    shifted["temperature_c"] += 15.0  # a heat wave: inputs move, nothing else does
    scores = drift.score_frame(champion_profile, shifted)
    default = drift.decide(scores, SETTINGS)
    assert "temperature_c" in default.drifted and not default.retrain
    assert "reported only" in default.summary()
    asked = drift.decide(scores, DriftSettings(trigger_on="target,features"))
    assert asked.retrain


def test_a_new_category_an_all_null_or_a_missing_column_is_reported_not_crashed_on(
    champion_profile,
):
    frame = as_scored(days(TRAINED_UNTIL, 1, DataSettings()))
    frame["hour_of_day"] = frame["hour_of_day"].astype(object)
    frame.loc[5, "hour_of_day"] = "noon"
    frame["wind_speed_ms"] = np.nan
    frame = frame.drop(columns=["solar_wm2"])
    scores = drift.score_frame(champion_profile, frame)
    assert scores["hour_of_day"].issue == "value 'noon' is not a number"
    assert scores["wind_speed_ms"].issue == "every value is null"
    assert scores["solar_wm2"].issue == "column is missing"
    assert scores["temperature_c"].psi is not None  # the rest is still scored
    verdict = drift.decide(scores, SETTINGS)
    assert {"hour_of_day", "wind_speed_ms", "solar_wm2"} <= set(verdict.drifted)


def test_growing_nulls_count_as_drift(champion_profile):
    frame = as_scored(days(TRAINED_UNTIL, 1, DataSettings()))
    frame.loc[: len(frame) // 2, "humidity_pct"] = np.nan
    verdict = drift.decide(drift.score_frame(champion_profile, frame), SETTINGS)
    assert "null share" in verdict.drifted["humidity_pct"]


def test_discrete_columns_get_unique_edges_and_values_on_an_edge_land_alike():
    values = pd.Series([0.0, 0.0, 0.0, 1.0] * 25, name="is_weekend")
    profile = drift.profile_column(values)
    assert profile.edges == [0.0, 1.0]
    assert profile.shares == [0.75, 0.25, 0.0]  # up to 0, (0, 1], above 1: Prometheus' `le`
    same = drift.score_column(profile, values.sample(frac=1.0, random_state=1), "is_weekend")
    assert same.psi == 0.0
    weekend_only = drift.score_column(profile, pd.Series([1.0] * 40), "is_weekend")
    assert weekend_only.psi > 1.0


def test_psi_of_known_shares():
    assert drift.psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    expected = (0.9 - 0.5) * np.log(0.9 / 0.5) + (0.1 - 0.5) * np.log(0.1 / 0.5)
    assert drift.psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(expected)


def test_a_profile_round_trips_through_json(champion_profile):
    import json

    again = json.loads(json.dumps(champion_profile))
    column = drift.ColumnProfile.from_dict(again["columns"]["temperature_c"])
    assert column.to_dict() == champion_profile["columns"]["temperature_c"]


def test_a_column_that_is_not_numeric_cannot_be_profiled():
    with pytest.raises(ValueError, match="not numbers"):
        drift.profile_column(pd.Series(["a", "b"], name="city"))


def _prometheus_buckets(values: np.ndarray, edges: list[float]) -> list[tuple[float, float]]:
    """What a Prometheus histogram with these bounds reports: cumulative counts per `le`."""
    return [(le, float(np.sum(values <= le))) for le in edges] + [(float("inf"), len(values))]


def test_served_histograms_score_like_the_rows_they_counted(champion_profile):
    column = drift.ColumnProfile.from_dict(champion_profile["columns"]["temperature_c"])
    newest = days(TRAINED_UNTIL, 3, DataSettings())["temperature_c"]
    from_rows = drift.score_column(column, newest, "temperature_c").psi
    served = drift.score_served(column, _prometheus_buckets(newest.to_numpy(), column.edges), "s")
    assert served.psi == pytest.approx(from_rows, abs=1e-6)


def test_served_histograms_with_other_bounds_or_nothing_served_are_not_scored(champion_profile):
    column = drift.ColumnProfile.from_dict(champion_profile["columns"]["temperature_c"])
    values = np.array([1.0, 2.0, 3.0])
    other_bounds = _prometheus_buckets(values, [e + 0.5 for e in column.edges])
    assert drift.score_served(column, other_bounds, "s") is None
    assert drift.score_served(column, _prometheus_buckets(values[:0], column.edges), "s") is None


def test_served_columns_count_as_their_columns_kind():
    assert drift.kind_of("served:temperature_c") == "features"
    assert drift.kind_of("served:__prediction__") == "prediction"


# -- the window's sample ----------------------------------------------------------------------


def _frames(sizes: list[int]) -> list[pd.DataFrame]:
    start = 0
    frames = []
    for size in sizes:
        frames.append(pd.DataFrame({"row": np.arange(start, start + size), "x": 1.0}))
        start += size
    return frames


def test_a_window_within_the_sample_size_is_scored_whole_in_order():
    frames = _frames([30, 0, 45])
    sample, total = drift.sample_frames(iter(frames), k=100)
    assert total == 75
    assert sample["row"].tolist() == list(range(75))


def test_a_larger_window_is_sampled_uniformly_deterministically_and_in_stream_order():
    frames = _frames([4_000] * 10)  # rows 0..39,999 in ten partitions
    sample, total = drift.sample_frames(iter(frames), k=2_000, seed=7)
    assert total == 40_000 and len(sample) == 2_000
    rows = sample["row"].to_numpy()
    assert (np.diff(rows) > 0).all()  # stream order, no row twice
    per_partition = np.bincount(rows // 4_000, minlength=10)
    assert per_partition.min() > 150 and per_partition.max() < 250  # ~200 each, not the first
    again, _ = drift.sample_frames(iter(_frames([4_000] * 10)), k=2_000, seed=7)
    assert again["row"].tolist() == rows.tolist()
    other, _ = drift.sample_frames(iter(_frames([4_000] * 10)), k=2_000, seed=8)
    assert other["row"].tolist() != rows.tolist()


def test_partitions_that_disagree_on_columns_are_combined_not_refused():
    first = pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0]})
    second = pd.DataFrame({"a": ["x", "y"]})  # b went missing, a holds strings
    sample, total = drift.sample_frames(iter([first, second]), k=10)
    assert total == 4
    assert sample["a"].tolist() == [1.0, 2.0, "x", "y"]
    assert sample["b"].isna().tolist() == [False, False, True, True]


def test_no_partition_is_an_empty_sample_and_a_bad_size_is_refused():
    sample, total = drift.sample_frames(iter([]))
    assert total == 0 and sample.empty
    with pytest.raises(ValueError, match="k must be at least 1"):
        drift.sample_frames(iter([]), k=0)
