"""The built-in synthetic data source (``PIPELINE_DATA_SOURCE=synthetic``): hourly-ish
electricity-load readings, generated deterministically from the date, written as the same
daily partitions a real source provides (:mod:`ml.data`)."""

from __future__ import annotations

import io
import logging
import math
import uuid
from datetime import date

import numpy as np
import pandas as pd

from ml.data import _day_dir, _day_files, _filesystem, _to_uri
from ml.schema import SYNTHETIC_FEATURES
from ml.settings import DataSettings

log = logging.getLogger(__name__)

__all__ = ["SYNTHETIC_FEATURES", "materialize_synthetic", "synthetic_labels", "synthetic_partition"]


def synthetic_partition(day: date, settings: DataSettings) -> pd.DataFrame:
    """One day of synthetic electricity-load readings; the same date always gives the same rows.

    Weather follows the season and the hour; load has a heating/cooling curve around 18 °C,
    morning and evening demand peaks (weaker morning on weekends), humid-heat and wind-chill
    interactions, and rooftop solar that lowers net load. From ``synthetic_drift_start`` on,
    the heating/cooling sensitivity and the base load grow with ``synthetic_drift_strength``
    (e.g. heat pumps and air conditioning being installed).
    """
    n = settings.synthetic_rows_per_day
    # Seeded from the date alone (with a fixed salt), never from global state.
    rng = np.random.default_rng(np.random.SeedSequence([20_240_101, day.toordinal()]))
    season = math.cos(2 * math.pi * (day.timetuple().tm_yday - 15) / 365.25)  # +1 mid-Jan

    # Weather shared by the whole day, then per reading.
    day_temp_offset = rng.normal(0.0, 3.0)
    day_wind_scale = rng.uniform(1.5, 3.5)
    hour = rng.integers(0, 24, size=n).astype("float64")
    temperature = (
        12.0
        - 10.0 * season
        + day_temp_offset
        + 5.0 * np.sin(2 * np.pi * (hour - 9.0) / 24.0)
        + rng.normal(0.0, 3.0, size=n)
    )
    temperature = np.clip(temperature, -15.0, 42.0)
    humidity = np.clip(70.0 - 1.2 * (temperature - 15.0) + rng.normal(0.0, 10.0, n), 5.0, 100.0)
    wind = np.clip(rng.gamma(2.0, day_wind_scale, size=n), 0.0, 30.0)
    cloud = np.clip((humidity - 30.0) / 70.0, 0.0, 1.0)
    daylight = np.clip(np.sin(np.pi * (hour - 6.0) / 12.0), 0.0, None)
    solar = 950.0 * daylight * (1.0 - 0.75 * cloud) * (0.6 - 0.4 * season)
    solar = np.clip(solar + rng.normal(0.0, 20.0, n) * (daylight > 0), 0.0, 1100.0)
    is_weekend = np.full(n, 1.0 if day.weekday() >= 5 else 0.0)

    readings = {
        "temperature_c": temperature,
        "humidity_pct": humidity,
        "hour_of_day": hour,
        "is_weekend": is_weekend,
        "wind_speed_ms": wind,
        "solar_wm2": solar,
    }
    load = _load(readings, day, settings, rng.normal(0.0, settings.synthetic_noise, size=n))
    return pd.DataFrame(
        {
            "temperature_c": np.round(temperature, 2),
            "humidity_pct": np.round(humidity, 1),
            "hour_of_day": hour,
            "is_weekend": is_weekend,
            "wind_speed_ms": np.round(wind, 2),
            "solar_wm2": np.round(solar, 1),
            settings.target_column: load,
        }
    )


def synthetic_labels(
    served: pd.DataFrame, day: date, settings: DataSettings, seed: int
) -> np.ndarray:
    """The ground truth of readings a model server answered on ``day`` (``served``: the
    feature columns): the load under that day's relationship, drift included, with noise
    drawn from ``seed`` (the same rows and seed give the same labels)."""
    rng = np.random.default_rng(np.random.SeedSequence([20_240_102, day.toordinal(), seed]))
    return _load(served, day, settings, rng.normal(0.0, settings.synthetic_noise, len(served)))


def _load(features, day: date, settings: DataSettings, noise: np.ndarray) -> np.ndarray:
    """The electricity load of readings ``features`` (columns by name) on ``day``."""
    temperature = np.asarray(features["temperature_c"], dtype="float64")
    humidity = np.asarray(features["humidity_pct"], dtype="float64")
    hour = np.asarray(features["hour_of_day"], dtype="float64")
    is_weekend = np.asarray(features["is_weekend"], dtype="float64")
    wind = np.asarray(features["wind_speed_ms"], dtype="float64")
    solar = np.asarray(features["solar_wm2"], dtype="float64")
    drift = (
        settings.synthetic_drift_strength
        if settings.synthetic_drift_start is not None and day >= settings.synthetic_drift_start
        else 0.0
    )
    heating_cooling = 0.05 * (1.0 + drift) * (temperature - 18.0) ** 2
    demand_peaks = 8.0 * (1.0 - 0.6 * is_weekend) * np.exp(-(((hour - 8.0) / 2.5) ** 2))
    demand_peaks += 12.0 * np.exp(-(((hour - 19.0) / 3.0) ** 2))
    humid_heat = 0.012 * (humidity - 40.0) * np.clip(temperature - 22.0, 0.0, None)
    wind_chill = 0.025 * wind * np.clip(12.0 - temperature, 0.0, None)
    load = (
        30.0
        + 5.0 * drift
        - 4.0 * is_weekend
        + heating_cooling
        + demand_peaks
        + humid_heat
        + wind_chill
        - 0.012 * solar
        + noise
    )
    # Load cannot be negative; only reachable with very large noise settings.
    return np.clip(load, 0.0, None)


def _encode(frame: pd.DataFrame, file_format: str) -> bytes:
    buffer = io.BytesIO()
    if file_format == "parquet":
        frame.to_parquet(buffer, index=False)
    elif file_format == "jsonl":
        frame.to_json(buffer, orient="records", lines=True)
    else:
        frame.to_csv(buffer, index=False)
    return buffer.getvalue()


def materialize_synthetic(settings: DataSettings, days: list[date]) -> list[str]:
    """Write the synthetic partition of each day that has none yet; return the uris written.

    Existing partitions are left untouched, so reruns are cheap and never change data a
    previous run already hashed. Each file is written under a temporary name and renamed,
    so a reader never sees half a file.
    """
    fs, root = _filesystem(settings)
    fs.invalidate_cache()
    written: list[str] = []
    for day in sorted(set(days)):
        if _day_files(fs, root, day, settings.format):
            continue
        folder = _day_dir(root, day)
        final = f"{folder}/part-0.{settings.format}"
        # Hidden and not ending in .<format>: discovery never picks it up.
        temporary = f"{folder}/.part-0.{uuid.uuid4().hex}.tmp"
        fs.makedirs(folder, exist_ok=True)
        fs.pipe_file(temporary, _encode(synthetic_partition(day, settings), settings.format))
        fs.mv(temporary, final)
        written.append(_to_uri(fs, settings, final))
    if written:
        log.info("wrote %d synthetic partition(s) under %s", len(written), settings.path)
    return written
