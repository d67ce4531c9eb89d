"""ml.data: partitions, validation, digest, split and the synthetic source (the schema
itself: test_schema.py)."""

from __future__ import annotations

import json
import logging
import os
import uuid
from datetime import date, datetime
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest

from ml.data import (
    DataNotFoundError,
    DataValidationError,
    Partition,
    discover_partitions,
    partitions_digest,
    read_frame,
    read_partition,
    split_holdout,
    validate_partitions,
    window_days,
)
from ml.schema import SYNTHETIC_FEATURES, ColumnSpec, DataSchema, load_schema
from ml.settings import DataSettings
from ml.synthetic import materialize_synthetic, synthetic_partition

DAY = date(2024, 3, 4)


def make_settings(tmp_path, **overrides) -> DataSettings:
    values = {
        "path": str(tmp_path / "data"),
        "synthetic_rows_per_day": 120,
        "min_rows_per_partition": 50,
        "min_rows_total": 100,
    }
    return DataSettings(**(values | overrides))


def write_partition(settings: DataSettings, day: date, frame: pd.DataFrame, name="part-0"):
    folder = f"{settings.path}/date={day.isoformat()}"
    fs, path = fsspec.core.url_to_fs(folder)
    fs.makedirs(path, exist_ok=True)
    uri = f"{folder}/{name}.{settings.format}"
    with fsspec.open(uri, "wb") as handle:
        if settings.format == "parquet":
            frame.to_parquet(handle, index=False)
        elif settings.format == "jsonl":
            frame.to_json(handle, orient="records", lines=True)
        else:
            frame.to_csv(handle, index=False)
    return uri


# --------------------------------------------------------------------------- synthetic


def test_synthetic_partition_is_deterministic_per_date(tmp_path):
    settings = make_settings(tmp_path)
    pd.testing.assert_frame_equal(
        synthetic_partition(DAY, settings), synthetic_partition(DAY, settings)
    )


def test_synthetic_partitions_differ_between_dates(tmp_path):
    settings = make_settings(tmp_path)
    first = synthetic_partition(DAY, settings)
    second = synthetic_partition(date(2024, 3, 5), settings)
    # Hour and wind come from the day's random draws alone, not from the calendar.
    assert not np.array_equal(first["hour_of_day"], second["hour_of_day"])
    assert not np.allclose(first["wind_speed_ms"], second["wind_speed_ms"])
    assert not np.allclose(first["target"], second["target"])


def test_synthetic_partition_shape_and_declared_ranges(tmp_path):
    settings = make_settings(tmp_path, synthetic_rows_per_day=500, target_column="load_mw")
    schema = load_schema(settings)
    # Winter and summer days stress the weather ranges from both sides.
    for day in (date(2024, 1, 15), date(2024, 7, 15)):
        frame = synthetic_partition(day, settings)
        assert list(frame.columns) == [*SYNTHETIC_FEATURES, "load_mw"]
        assert len(frame) == 500
        assert not frame.isna().any().any()
        for spec in schema.columns:
            assert spec.min is None or frame[spec.name].min() >= spec.min, spec.name
            assert spec.max is None or frame[spec.name].max() <= spec.max, spec.name
        assert 10 <= frame["load_mw"].mean() <= 100


def test_synthetic_noise_sets_the_target_spread(tmp_path):
    quiet = synthetic_partition(DAY, make_settings(tmp_path, synthetic_noise=0.0))
    noisy = synthetic_partition(DAY, make_settings(tmp_path, synthetic_noise=2.0))
    pd.testing.assert_frame_equal(quiet[SYNTHETIC_FEATURES], noisy[SYNTHETIC_FEATURES])
    assert (noisy["target"] - quiet["target"]).std() == pytest.approx(2.0, rel=0.2)


def test_synthetic_drift_changes_the_relationship_from_its_start_date(tmp_path):
    plain = make_settings(tmp_path)
    drifting = make_settings(tmp_path, synthetic_drift_start=DAY, synthetic_drift_strength=0.5)
    before = date(2024, 3, 3)
    pd.testing.assert_frame_equal(
        synthetic_partition(before, plain), synthetic_partition(before, drifting)
    )
    base, drifted = synthetic_partition(DAY, plain), synthetic_partition(DAY, drifting)
    # Same inputs, different target: concept drift, not a new sample.
    pd.testing.assert_frame_equal(base[SYNTHETIC_FEATURES], drifted[SYNTHETIC_FEATURES])
    assert (drifted["target"] - base["target"]).mean() > 2.0
    pd.testing.assert_frame_equal(drifted, synthetic_partition(DAY, drifting))


# --------------------------------------------------------------------------- window


def test_window_days_ends_before_end():
    days = window_days(date(2024, 3, 8), 7)
    assert days == [date(2024, 3, d) for d in range(1, 8)]
    assert window_days(date(2024, 3, 1), 1) == [date(2024, 2, 29)]


def test_window_days_accepts_a_datetime_interval_end():
    assert window_days(datetime(2024, 3, 8, 0, 0), 2) == [date(2024, 3, 6), date(2024, 3, 7)]


def test_window_days_rejects_an_empty_window():
    with pytest.raises(ValueError, match="at least one day"):
        window_days(DAY, 0)


# --------------------------------------------------------------------------- materialize


def test_materialize_writes_only_missing_partitions(tmp_path):
    settings = make_settings(tmp_path)
    days = window_days(date(2024, 3, 4), 3)
    first = materialize_synthetic(settings, days[:2])
    assert len(first) == 2
    mtimes = {uri: os.stat(uri).st_mtime_ns for uri in first}

    second = materialize_synthetic(settings, days)
    assert second == [f"{settings.path}/date=2024-03-03/part-0.parquet"]
    assert {uri: os.stat(uri).st_mtime_ns for uri in first} == mtimes
    assert materialize_synthetic(settings, days) == []
    # No temporary files are left behind.
    assert sorted(p.name for p in (tmp_path / "data").rglob("*")) == [
        "date=2024-03-01",
        "date=2024-03-02",
        "date=2024-03-03",
        "part-0.parquet",
        "part-0.parquet",
        "part-0.parquet",
    ]


def test_materialized_partition_reads_back_as_generated(tmp_path):
    settings = make_settings(tmp_path, format="csv")
    (uri,) = materialize_synthetic(settings, [DAY])
    assert uri.endswith("date=2024-03-04/part-0.csv")
    frame = read_partition(Partition(DAY, uri), settings)
    pd.testing.assert_frame_equal(frame, synthetic_partition(DAY, settings), check_dtype=False)


# --------------------------------------------------------------------------- discover


@pytest.mark.parametrize("file_format", ["parquet", "csv", "jsonl"])
def test_discover_finds_partitions_sorted_with_several_files_per_day(tmp_path, file_format):
    settings = make_settings(tmp_path, format=file_format)
    frame = synthetic_partition(DAY, settings)
    write_partition(settings, date(2024, 3, 2), frame, "b")
    write_partition(settings, date(2024, 3, 2), frame, "a")
    write_partition(settings, date(2024, 3, 1), frame, "z")
    # Files of the other format, writer bookkeeping and temp files are not partitions.
    other = "csv" if file_format == "parquet" else "parquet"
    (tmp_path / "data" / "date=2024-03-01" / f"x.{other}").write_text("nope")
    (tmp_path / "data" / "date=2024-03-01" / "_SUCCESS").write_text("")
    (tmp_path / "data" / "date=2024-03-01" / f".tmp.{file_format}").write_text("half")

    partitions = discover_partitions(settings, [date(2024, 3, 2), date(2024, 3, 1)])

    root = settings.path
    assert partitions == [
        Partition(date(2024, 3, 1), f"{root}/date=2024-03-01/z.{file_format}"),
        Partition(date(2024, 3, 2), f"{root}/date=2024-03-02/a.{file_format}"),
        Partition(date(2024, 3, 2), f"{root}/date=2024-03-02/b.{file_format}"),
    ]


def test_discover_skips_missing_days_with_a_warning(tmp_path, caplog):
    settings = make_settings(tmp_path)
    materialize_synthetic(settings, [date(2024, 3, 1), date(2024, 3, 3)])

    with caplog.at_level(logging.WARNING, logger="ml.data"):
        partitions = discover_partitions(settings, window_days(date(2024, 3, 4), 3))

    assert [p.day for p in partitions] == [date(2024, 3, 1), date(2024, 3, 3)]
    assert "2024-03-02" in caplog.text
    assert "2024-03-01" not in caplog.text


def test_discover_with_no_partitions_names_the_path_and_window(tmp_path):
    settings = make_settings(tmp_path)
    materialize_synthetic(settings, [date(2024, 2, 1)])
    with pytest.raises(DataNotFoundError) as excinfo:
        discover_partitions(settings, window_days(date(2024, 3, 4), 3))
    message = str(excinfo.value)
    assert settings.path in message
    assert "2024-03-01..2024-03-03" in message


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_fsspec_urls_round_trip(tmp_path, scheme):
    if scheme == "file":
        path = f"file://{tmp_path / 'data'}"
    else:
        path = f"memory://test-data-{uuid.uuid4().hex}"
    settings = make_settings(tmp_path, path=path)
    days = window_days(date(2024, 3, 4), 3)
    try:
        written = materialize_synthetic(settings, days)
        assert all(uri.startswith(f"{scheme}://") for uri in written)
        assert materialize_synthetic(settings, days) == []

        partitions = discover_partitions(settings, days)
        assert [p.uri for p in partitions] == written
        report = validate_partitions(partitions, load_schema(settings), settings)
        assert report.total_rows == 360
        frame = read_frame(partitions, load_schema(settings), settings)
        assert len(frame) == 360
        assert len(partitions_digest(partitions)) == 64
    finally:
        if scheme == "memory":
            fsspec.filesystem("memory").rm(path, recursive=True)


# --------------------------------------------------------------------------- digest


def test_digest_is_stable_and_follows_every_byte(tmp_path):
    settings = make_settings(tmp_path, format="csv")
    days = window_days(date(2024, 3, 4), 3)
    materialize_synthetic(settings, days)
    partitions = discover_partitions(settings, days)
    digest = partitions_digest(partitions)
    assert digest == partitions_digest(partitions)

    # The same files under another root hash the same: the digest names data, not places.
    moved = make_settings(tmp_path, format="csv", path=str(tmp_path / "copy"))
    materialize_synthetic(moved, days)
    assert partitions_digest(discover_partitions(moved, days)) == digest

    target = Path(partitions[1].uri)
    original = target.read_bytes()
    changed = bytearray(original)
    changed[len(changed) // 2] ^= 0x01
    target.write_bytes(bytes(changed))
    assert partitions_digest(partitions) != digest

    target.write_bytes(original)
    assert partitions_digest(partitions) == digest

    assert partitions_digest(partitions[:2]) != digest

    # Same bytes under another name is different data lineage.
    renamed = target.with_name("part-1.csv")
    target.rename(renamed)
    moved_partitions = [
        *partitions[:1],
        Partition(partitions[1].day, str(renamed)),
        *partitions[2:],
    ]
    assert partitions_digest(moved_partitions) != digest


# --------------------------------------------------------------------------- validation


def _drop_target(frame):
    return frame.drop(columns=["target"])


def _text_humidity(frame):
    return frame.assign(humidity_pct=["humid"] * len(frame))


def _null_wind(frame):
    wind = frame["wind_speed_ms"].copy()
    wind.iloc[:3] = np.nan
    return frame.assign(wind_speed_ms=wind)


def _hot_temperature(frame):
    temperature = frame["temperature_c"].copy()
    temperature.iloc[:12] = 97.2
    return frame.assign(temperature_c=temperature)


def _negative_solar(frame):
    return frame.assign(solar_wm2=frame["solar_wm2"] - 5000.0)


def _infinite_target(frame):
    target = frame["target"].copy()
    target.iloc[0] = np.inf
    return frame.assign(target=target)


def _few_rows(frame):
    return frame.head(10)


VALIDATION_CASES = [
    # (id, corrupt the first partition, column, rule, detail fragment)
    ("schema", _drop_target, "target", "schema", "missing"),
    ("type", _text_humidity, "humidity_pct", "type", "expected numeric"),
    ("nulls", _null_wind, "wind_speed_ms", "nulls", "3 nulls"),
    ("range-max", _hot_temperature, "temperature_c", "range", "12 values above max 50.0"),
    ("range-min", _negative_solar, "solar_wm2", "range", "values below min 0.0"),
    ("range-inf", _infinite_target, "target", "range", "1 infinite values"),
    ("min_rows", _few_rows, "*", "min_rows", "10 rows, need at least 50"),
]


@pytest.mark.parametrize(
    ("corrupt", "column", "rule", "detail"),
    [case[1:] for case in VALIDATION_CASES],
    ids=[case[0] for case in VALIDATION_CASES],
)
def test_each_rule_names_partition_column_and_rule(tmp_path, corrupt, column, rule, detail):
    settings = make_settings(tmp_path)
    days = [date(2024, 3, 1), date(2024, 3, 2)]
    bad_uri = write_partition(settings, days[0], corrupt(synthetic_partition(days[0], settings)))
    materialize_synthetic(settings, days)  # the second day stays good
    partitions = discover_partitions(settings, days)

    with pytest.raises(DataValidationError) as excinfo:
        validate_partitions(partitions, load_schema(settings), settings)

    rules = [(v.partition, v.column, v.rule) for v in excinfo.value.violations]
    assert rules == [(bad_uri, column, rule)]
    assert f"{bad_uri}: column '{column}' failed rule '{rule}': " in str(excinfo.value)
    assert detail in excinfo.value.violations[0].detail


def test_nullable_columns_may_hold_nulls(tmp_path):
    settings = make_settings(tmp_path)
    schema = load_schema(settings)
    schema = DataSchema(
        features=tuple(
            ColumnSpec(s.name, s.min, s.max, nullable=s.name == "wind_speed_ms")
            for s in schema.features
        ),
        target=schema.target,
    )
    uri = write_partition(settings, DAY, _null_wind(synthetic_partition(DAY, settings)))
    report = validate_partitions([Partition(DAY, uri)], schema, settings)
    assert report.total_rows == 120


def test_min_rows_total_is_checked_across_partitions(tmp_path):
    settings = make_settings(tmp_path, min_rows_total=1000)
    days = window_days(date(2024, 3, 4), 3)
    materialize_synthetic(settings, days)
    with pytest.raises(DataValidationError) as excinfo:
        validate_partitions(discover_partitions(settings, days), load_schema(settings), settings)
    (violation,) = excinfo.value.violations
    assert violation.rule == "min_rows_total"
    assert "360 rows" in violation.detail
    assert "failed rule 'min_rows_total'" in str(excinfo.value)


def test_corrupt_parquet_is_a_readable_violation(tmp_path):
    settings = make_settings(tmp_path)
    folder = tmp_path / "data" / "date=2024-03-04"
    folder.mkdir(parents=True)
    (folder / "part-0.parquet").write_bytes(b"\x00garbage, not parquet\xff" * 10)
    (partition,) = discover_partitions(settings, [DAY])

    with pytest.raises(DataValidationError) as excinfo:
        read_partition(partition, settings)
    assert excinfo.value.violations[0].rule == "readable"
    assert partition.uri in str(excinfo.value)

    with pytest.raises(DataValidationError) as excinfo:
        validate_partitions([partition], load_schema(settings), settings)
    assert [v.rule for v in excinfo.value.violations] == ["readable", "min_rows_total"]
    assert f"{partition.uri}: column '*' failed rule 'readable'" in str(excinfo.value)


def test_violations_from_all_partitions_are_collected(tmp_path):
    settings = make_settings(tmp_path)
    first = write_partition(
        settings, date(2024, 3, 1), _null_wind(synthetic_partition(DAY, settings))
    )
    second = write_partition(
        settings, date(2024, 3, 2), _few_rows(synthetic_partition(DAY, settings))
    )
    partitions = discover_partitions(settings, [date(2024, 3, 1), date(2024, 3, 2)])
    with pytest.raises(DataValidationError) as excinfo:
        validate_partitions(partitions, load_schema(settings), settings)
    assert [(v.partition, v.rule) for v in excinfo.value.violations] == [
        (first, "nulls"),
        (second, "min_rows"),
    ]


def test_validation_report_is_json_able(tmp_path):
    settings = make_settings(tmp_path)
    days = window_days(date(2024, 3, 4), 2)
    written = materialize_synthetic(settings, days)
    report = validate_partitions(
        discover_partitions(settings, days), load_schema(settings), settings
    )
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict == {
        "rows_per_partition": {uri: 120 for uri in written},
        "total_rows": 240,
        "columns": [*SYNTHETIC_FEATURES, "target"],
    }


def test_schema_file_overlay_is_enforced(tmp_path):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps({"features": [{"name": "temperature_c", "max": 10}]}))
    settings = make_settings(tmp_path, schema_file=str(schema_file))
    uri = write_partition(
        settings, date(2024, 7, 15), synthetic_partition(date(2024, 7, 15), settings)
    )
    with pytest.raises(DataValidationError) as excinfo:
        validate_partitions([Partition(date(2024, 7, 15), uri)], load_schema(settings), settings)
    assert [(v.column, v.rule) for v in excinfo.value.violations] == [("temperature_c", "range")]
    assert "above max 10.0" in str(excinfo.value)


def test_read_frame_keeps_schema_columns_as_float64(tmp_path):
    settings = make_settings(tmp_path, format="csv")
    days = window_days(date(2024, 3, 4), 2)
    materialize_synthetic(settings, days)
    write_partition(
        settings, days[0], synthetic_partition(days[0], settings).assign(extra="x"), "extra"
    )
    partitions = discover_partitions(settings, days)

    frame = read_frame(partitions, load_schema(settings), settings)

    assert list(frame.columns) == [*SYNTHETIC_FEATURES, "target"]
    assert set(frame.dtypes) == {np.dtype("float64")}
    assert len(frame) == 360
    assert frame.index.equals(pd.RangeIndex(360))


def test_read_frame_refuses_a_missing_column(tmp_path):
    settings = make_settings(tmp_path)
    uri = write_partition(settings, DAY, _drop_target(synthetic_partition(DAY, settings)))
    with pytest.raises(DataValidationError, match="column 'target' failed rule 'schema'"):
        read_frame([Partition(DAY, uri)], load_schema(settings), settings)


# --------------------------------------------------------------------------- split


def test_split_holdout_is_deterministic_and_sized(tmp_path):
    frame = synthetic_partition(DAY, make_settings(tmp_path, synthetic_rows_per_day=1000))
    train, holdout = split_holdout(frame, 0.2, seed=7)
    again_train, again_holdout = split_holdout(frame, 0.2, seed=7)
    pd.testing.assert_frame_equal(train, again_train)
    pd.testing.assert_frame_equal(holdout, again_holdout)
    # A hash per row decides: about the fraction (binomial, 1000 x 0.2: sd 12.6).
    assert 150 <= len(holdout) <= 250
    assert len(train) + len(holdout) == 1000
    assert train.index.equals(pd.RangeIndex(len(train)))
    # A partition of the rows: nothing lost, nothing shared.
    together = pd.concat([train, holdout]).sort_values(list(frame.columns), ignore_index=True)
    pd.testing.assert_frame_equal(
        together, frame.sort_values(list(frame.columns), ignore_index=True)
    )

    _, other_holdout = split_holdout(frame, 0.2, seed=8)
    assert not other_holdout.equals(holdout)


def test_split_holdout_follows_row_content_not_position(tmp_path):
    frame = synthetic_partition(DAY, make_settings(tmp_path, synthetic_rows_per_day=500))
    _, holdout = split_holdout(frame, 0.3, seed=1)
    shuffled = frame.sample(frac=1.0, random_state=3).reset_index(drop=True)
    _, shuffled_holdout = split_holdout(shuffled, 0.3, seed=1)
    key = list(frame.columns)
    pd.testing.assert_frame_equal(
        holdout.sort_values(key, ignore_index=True),
        shuffled_holdout.sort_values(key, ignore_index=True),
    )
    # Stored as integers or floats, the same values are the same rows.
    as_ints = frame.assign(hour_of_day=frame["hour_of_day"].astype("int64"))
    _, int_holdout = split_holdout(as_ints, 0.3, seed=1)
    np.testing.assert_array_equal(int_holdout.to_numpy("float64"), holdout.to_numpy("float64"))


def test_streamed_window_holds_out_the_rows_split_holdout_does(tmp_path):
    from ml.data import window_source

    for file_format in ("parquet", "csv", "jsonl"):  # jsonl: the slim server's payload log
        settings = make_settings(tmp_path, format=file_format, path=str(tmp_path / file_format))
        days = window_days(date(2024, 3, 4), 3)
        materialize_synthetic(settings, days)
        partitions = discover_partitions(settings, days)
        schema = load_schema(settings)
        whole = read_frame(partitions, schema, settings)
        train, holdout = split_holdout(whole, settings.holdout_fraction, settings.split_seed)

        def rows(part, settings=settings, partitions=partitions, schema=schema):
            source = window_source(partitions, schema, settings, part)
            return np.concatenate([values for values, _ in source.batches()])

        np.testing.assert_array_equal(rows("holdout"), holdout.to_numpy("float64"))
        np.testing.assert_array_equal(rows("train"), train.to_numpy("float64"))
        assert len(rows(None)) == 360


def test_split_holdout_refuses_a_side_left_empty():
    frame = pd.DataFrame({"x": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="leave one side empty"):
        split_holdout(frame, 0.01, seed=0)
    with pytest.raises(ValueError, match="at least 2 rows"):
        split_holdout(frame.head(1), 0.5, seed=0)
