"""Data drift: a profile of the data a model was trained on, and a per-column score against it.

Pure functions, no MLflow and no I/O (``ml.pipeline`` logs and reads the profiles).
:func:`profile_frame` keeps, per numeric column, its quantile bin edges (deciles; discrete
columns collapse to fewer), the share of rows per bin, of nulls and a summary;
:func:`score_frame` gives each column's population stability index over those bins
(``sum((actual - expected) * ln(actual / expected))``, empty bins floored at ``EPSILON``;
by the usual reading below 0.1 is stable, above 0.25 a real shift). A column missing, all
null or not numeric is an issue that counts as drifted, never a crash. :func:`decide` says
which columns drifted and whether one of a ``trigger_on`` kind calls for a retrain.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ml.plotting import new_figure
from ml.settings import DriftSettings

PROFILE_VERSION = 1
EPSILON = 1e-4
# Pseudo-columns profiled next to the features.
TARGET_KEY = "__target__"
PREDICTION_KEY = "__prediction__"
# Scores of what the model server answered (its Prometheus histograms) are named served:<column>.
SERVED_PREFIX = "served:"


@dataclass(frozen=True)
class ColumnProfile:
    """One column of the reference data: bins, shares, nulls, summary."""

    edges: list[float]  # inner bin edges, increasing; the outer bins are open-ended
    shares: list[float]  # len(edges) + 1 shares, summing to 1
    null_share: float
    rows: int
    summary: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ColumnProfile:
        return cls(
            edges=[float(x) for x in data["edges"]],
            shares=[float(x) for x in data["shares"]],
            null_share=float(data["null_share"]),
            rows=int(data["rows"]),
            summary={k: float(v) for k, v in data.get("summary", {}).items()},
        )


def _numeric(values: pd.Series) -> np.ndarray | None:
    """The non-null values as float64, or None when any of them is not a number."""
    present = values.dropna()
    if present.dtype == bool:
        return None
    if pd.api.types.is_numeric_dtype(present.dtype):
        return present.to_numpy(dtype="float64")
    converted = pd.to_numeric(present, errors="coerce")
    return None if converted.isna().any() else converted.to_numpy(dtype="float64")


# What monitor_drift scores a window on: a uniform sample of at most this many rows (the size
# of the holdout sample the champion's profile came from, ml.evaluate.SAMPLE_ROWS).
SAMPLE_ROWS = 100_000
SAMPLE_SEED = 0


def sample_frames(
    frames: Iterable[pd.DataFrame], k: int = SAMPLE_ROWS, seed: int = SAMPLE_SEED
) -> tuple[pd.DataFrame, int]:
    """A uniform sample of at most ``k`` rows of ``frames`` read one at a time, and their total
    row count: memory holds the sample and one frame, never all of them.

    Each row gets a seeded random key and the ``k`` smallest keys stay, in stream order; with
    ``k`` rows or fewer in all, the sample is every row. Frames may disagree on columns or
    types (a finding for the scores, not an error): they are combined as ``pd.concat`` does.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    rng = np.random.default_rng(seed)
    kept: pd.DataFrame | None = None
    keys = np.empty(0)
    total = 0
    for frame in frames:
        total += len(frame)
        frame_keys = rng.random(len(frame))
        if kept is None:
            kept, keys = frame.reset_index(drop=True), frame_keys
        else:
            kept = pd.concat([kept, frame], ignore_index=True)
            keys = np.concatenate([keys, frame_keys])
        if len(kept) > k:
            chosen = np.sort(np.argpartition(keys, k)[:k])
            kept, keys = kept.iloc[chosen].reset_index(drop=True), keys[chosen]
    return (kept if kept is not None else pd.DataFrame()), total


def profile_column(values: pd.Series, bins: int = 10) -> ColumnProfile:
    """The bins (quantile edges) and shares of one numeric column."""
    numbers = _numeric(values)
    if numbers is None:
        raise ValueError(f"column {values.name!r} holds values that are not numbers")
    if numbers.size == 0:
        raise ValueError(f"column {values.name!r} has no values to profile")
    quantiles = np.quantile(numbers, np.linspace(0, 1, bins + 1)[1:-1])
    edges = sorted({float(q) for q in quantiles})
    p01, p50, p99 = np.quantile(numbers, [0.01, 0.5, 0.99])
    summary = dict(min=numbers.min(), p01=p01, p50=p50, p99=p99, max=numbers.max(),
                   mean=numbers.mean(), std=numbers.std())  # fmt: skip
    return ColumnProfile(
        edges=edges,
        shares=_shares(numbers, edges).tolist(),
        null_share=1.0 - numbers.size / max(len(values), 1),
        rows=len(values),
        summary={key: float(value) for key, value in summary.items()},
    )


def _shares(numbers: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    # Bin i holds (edges[i-1], edges[i]]: a value equal to an edge falls in the bin it closes,
    # as in a Prometheus histogram's `le` buckets, so the model server's histograms (whose
    # bounds are these edges) count served inputs in the same bins (discrete columns put each
    # value on an edge).
    index = np.searchsorted(np.asarray(edges, dtype="float64"), numbers, side="left")
    counts = np.bincount(index, minlength=len(edges) + 1).astype("float64")
    return counts / max(numbers.size, 1)


def profile_frame(frame: pd.DataFrame, columns: Iterable[str], bins: int = 10) -> dict[str, Any]:
    """The profile of ``columns`` of ``frame`` (JSON-able; what the training run logs)."""
    return {
        "version": PROFILE_VERSION,
        "bins": bins,
        "rows": len(frame),
        "columns": {c: profile_column(frame[c], bins).to_dict() for c in columns},
    }


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """Population stability index of two share vectors over the same bins."""
    e = np.maximum(np.asarray(expected, dtype="float64"), EPSILON)
    a = np.maximum(np.asarray(actual, dtype="float64"), EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


@dataclass(frozen=True)
class ColumnScore:
    column: str
    psi: float | None  # None when the column could not be scored (see ``issue``)
    null_share: float
    reference_null_share: float
    issue: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_column(reference: ColumnProfile, values: pd.Series | None, name: str) -> ColumnScore:
    if values is None:
        return ColumnScore(name, None, 1.0, reference.null_share, "column is missing")
    null_share = float(values.isna().mean()) if len(values) else 1.0
    numbers = _numeric(values)
    if numbers is None:
        why = f"value {_first_non_number(values)!r} is not a number"
        return ColumnScore(name, None, null_share, reference.null_share, why)
    if numbers.size == 0:
        return ColumnScore(name, None, null_share, reference.null_share, "every value is null")
    value = psi(reference.shares, _shares(numbers, reference.edges))
    return ColumnScore(name, round(value, 6), null_share, reference.null_share)


def _first_non_number(values: pd.Series) -> Any:
    present = values.dropna()
    if present.dtype == bool:
        return present.iloc[0].item()
    converted = pd.to_numeric(present, errors="coerce")
    return present[converted.isna()].iloc[0]


def score_served(
    reference: ColumnProfile, buckets: Sequence[tuple[float, float]], name: str
) -> ColumnScore | None:
    """PSI of what a model server answered, from its Prometheus histogram of the column.

    ``buckets``: ``(le, cumulative count)`` pairs (``le`` may be ``inf``), e.g. the
    ``increase(model_server_feature_value_bucket[...])`` of one column over the window. The
    server's bucket bounds are the profile's edges, so the bins line up one to one; None when
    they do not (another version's profile, thinned buckets) or nothing was served.
    """
    finite = sorted((le, count) for le, count in buckets if math.isfinite(le))
    total = max((count for le, count in buckets if math.isinf(le)), default=None)
    if total is None or total <= 0:
        return None
    if not np.allclose([le for le, _ in finite], reference.edges, rtol=1e-9, atol=1e-12):
        return None
    cumulative = np.array([count for _, count in finite] + [total], dtype="float64")
    shares = np.diff(cumulative, prepend=0.0).clip(min=0.0) / total
    return ColumnScore(name, round(psi(reference.shares, shares), 6), 0.0, reference.null_share)


def score_frame(
    profile: Mapping[str, Any], frame: pd.DataFrame, extra: Mapping[str, pd.Series] | None = None
) -> dict[str, ColumnScore]:
    """Score every profiled column found in ``frame`` or ``extra`` (e.g. predictions)."""
    columns = {**{c: frame[c] for c in frame.columns}, **(extra or {})}
    return {
        name: score_column(ColumnProfile.from_dict(ref), columns.get(name), name)
        for name, ref in profile["columns"].items()
    }


def kind_of(column: str) -> str:
    """``target``, ``prediction`` or ``features``: the groups ``trigger_on`` names (a served
    column, ``served:<column>``, is of its column's kind)."""
    column = column.removeprefix(SERVED_PREFIX)
    if column == TARGET_KEY:
        return "target"
    if column == PREDICTION_KEY:
        return "prediction"
    return "features"


def threshold_for(column: str, settings: DriftSettings) -> float:
    return {
        "target": settings.target_psi,
        "prediction": settings.prediction_psi,
        "features": settings.feature_psi,
    }[kind_of(column)]


@dataclass(frozen=True)
class DriftVerdict:
    """``drifted``: column -> why (every column past its threshold, or with an issue).
    ``retrain``: whether any of them is of a kind ``trigger_on`` names."""

    drifted: dict[str, str] = field(default_factory=dict)
    retrain: bool = False
    trigger_on: tuple[str, ...] = ()

    @property
    def reasons(self) -> list[str]:
        return [f"{column}: {why}" for column, why in self.drifted.items()]

    def summary(self) -> str:
        if not self.drifted:
            return "no drift"
        on = ", ".join(self.trigger_on)
        verdict = "retrain" if self.retrain else f"reported only (retrains on {on})"
        return f"{verdict}: " + "; ".join(self.reasons)


def decide(scores: Mapping[str, ColumnScore], settings: DriftSettings) -> DriftVerdict:
    """Which columns drifted (PSI past the threshold, nulls grew, or an issue) and whether that
    calls for a retrain."""
    drifted: dict[str, str] = {}
    for name, s in scores.items():
        if s.issue is not None:
            drifted[name] = s.issue
            continue
        limit = threshold_for(name, settings)
        why = []
        if s.psi is not None and s.psi > limit:
            why.append(f"PSI {s.psi:.3f} > {limit:g}")
        if s.null_share - s.reference_null_share > settings.max_null_share_increase:
            why.append(f"null share {s.null_share:.1%} (was {s.reference_null_share:.1%})")
        if why:
            drifted[name] = ", ".join(why)
    trigger_on = tuple(settings.trigger_on)
    retrain = any(kind_of(name) in trigger_on for name in drifted)
    return DriftVerdict(drifted=drifted, retrain=retrain, trigger_on=trigger_on)


def psi_figure(scores: Mapping[str, ColumnScore], settings: DriftSettings):
    """Bars of each column's PSI, its threshold as a tick, unscored columns marked."""
    names = list(scores)
    values = [scores[n].psi if scores[n].psi is not None else 0.0 for n in names]
    figure = new_figure(max(6.0, 0.9 * len(names)), 4.0)
    ax = figure.add_subplot()
    bars = ax.bar(range(len(names)), values)
    for i, name in enumerate(names):
        limit = threshold_for(name, settings)
        ax.hlines(limit, i - 0.4, i + 0.4, colors="black", linewidth=1)
        if scores[name].issue is not None:
            bars[i].set_hatch("//")
            ax.annotate("not scored", (i, 0), ha="center", va="bottom", rotation=90, fontsize=8)
        elif scores[name].psi is not None and scores[name].psi > limit:
            bars[i].set_color("tab:red")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set(ylabel="PSI", title="Drift against @champion's training data (line: threshold)")
    return figure
