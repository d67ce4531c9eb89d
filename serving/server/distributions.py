"""The input and prediction distributions (``model_server_feature_value{feature}``,
``model_server_prediction_value``): histograms whose series each have their own buckets.

Every answered row counts once per input column (the fast path's feature columns, else the
schema's numeric named columns) and its prediction once; non-finite values are not counted.
One ``feature`` label per column, the first ``--max-feature-histograms`` only (a warning names
the others), at most :data:`MAX_HISTOGRAM_BUCKETS` bounds per series. Buckets are fixed at
load: the edges of the training run's drift profile (``drift/profile.json``, the holdout's
deciles; ``__prediction__``), comparable with the drift monitor's bins (only values exactly on
an edge differ: ``le`` puts them at or below), else :data:`GENERIC_VALUE_BUCKETS` (a generic
model's scale is unknown). A worker that could not read the profile uses the generic buckets:
the merged series then has both sets of bounds (counts and sums stay right, a cumulative count
at a bound only some workers have is too low). Nothing is counted on the request path: each
flush of the records counts whole batches with numpy (one ``searchsorted`` per column, one
``bincount``): ~0.1 ms per flush of 256 single-row requests at 8 clients (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from prometheus_client import values
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from serving.server.contract import DRIFT_PROFILE_PREDICTION

log = logging.getLogger(__name__)

FEATURE_VALUE = "model_server_feature_value"
PREDICTION_VALUE = "model_server_prediction_value"
# At most this many input columns get a feature histogram (--max-feature-histograms).
DEFAULT_MAX_FEATURE_HISTOGRAMS = 32
# At most this many bucket bounds per histogram (+Inf besides): more edges are thinned evenly.
MAX_HISTOGRAM_BUCKETS = 32
# Buckets of a column the model's drift profile does not cover (or a model without one):
# symmetric, roughly logarithmic, for values of any sign and scale.
GENERIC_VALUE_BUCKETS = (
    -1000.0, -100.0, -10.0, -5.0, -2.0, -1.0, -0.5, -0.1,
    0.0, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 100.0, 1000.0,
)  # fmt: skip


def bucket_bounds(edges: Any) -> tuple[float, ...] | None:
    """A drift profile column's ``edges`` as histogram bounds: the finite numbers, sorted,
    without duplicates, thinned evenly (first and last kept) to ``MAX_HISTOGRAM_BUCKETS``;
    None when that leaves nothing (or ``edges`` is not a list of numbers)."""
    if not isinstance(edges, list | tuple):
        return None
    try:
        numbers = sorted({float(e) for e in edges if not isinstance(e, bool)})
    except (TypeError, ValueError):
        return None
    bounds = [b for b in numbers if math.isfinite(b)]
    if len(bounds) > MAX_HISTOGRAM_BUCKETS:
        keep = np.unique(np.linspace(0, len(bounds) - 1, MAX_HISTOGRAM_BUCKETS).round().astype(int))
        bounds = [bounds[i] for i in keep.tolist()]
    return tuple(bounds) or None


class _Distribution:
    """One histogram family whose series (one per label value) each have their own fixed
    bounds, which ``prometheus_client``'s ``Histogram`` cannot do: counts and sums in numpy
    arrays, fed whole columns at once.

    With one process those arrays are the histogram, exposed by :meth:`collect` as a
    ``Histogram`` would be. With several workers they hold what is not yet written, and
    :meth:`write` (``ServerMetrics.publish``: every 0.25 s and before every ``/metrics``
    answer) adds it to ``prometheus_client``'s own value objects in the worker's
    ``histogram_<pid>.db`` (one ``inc`` per non-empty bucket, a few times a second), which
    ``MultiProcessCollector`` merges per label set like any histogram's.
    """

    def __init__(
        self, name: str, doc: str, label: str | None, series: Sequence[tuple[str, Sequence[float]]]
    ) -> None:
        self.name = name
        self.doc = doc
        labelnames: tuple[str, ...] = (label,) if label else ()
        self._series: list[tuple[dict[str, str], list[str], int]] = []  # labels, les, offset
        self._bounds: list[np.ndarray] = []
        offset = 0
        for value, bounds in series:
            labels = {label: value} if label else {}
            les = [*(floatToGoString(b) for b in bounds), "+Inf"]
            self._series.append((labels, les, offset))
            self._bounds.append(np.asarray(bounds, dtype=np.float64))
            offset += len(les)
        self._counts = np.zeros(offset, dtype=np.int64)
        self._sums = np.zeros(len(series), dtype=np.float64)
        self._files: tuple[list[Any], list[Any]] | None = None
        if getattr(values.ValueClass, "_multiprocess", False):
            make = values.ValueClass
            buckets, sums = [], []
            for labels, les, _ in self._series:
                labelvalues = tuple(labels.values())
                buckets += [
                    make("histogram", name, f"{name}_bucket", (*labels, "le"),
                         (*labelvalues, le), doc)
                    for le in les
                ]  # fmt: skip
                sums.append(make("histogram", name, f"{name}_sum", labelnames, labelvalues, doc))
            self._files = buckets, sums

    def observe(self, matrix: np.ndarray) -> None:
        """``matrix``: one row per observation, column ``j`` for series ``j``. Values that are
        not finite (NaN: missing) are left out."""
        if not matrix.shape[0]:
            return
        n_slots = len(self._counts)
        index = np.empty(matrix.shape, dtype=np.intp)
        for j, (bounds, (_, _, offset)) in enumerate(zip(self._bounds, self._series, strict=True)):
            # side="left": a value equal to a bound is in that bound's bucket (le: <=)
            np.add(bounds.searchsorted(matrix[:, j]), offset, out=index[:, j])
        finite = np.isfinite(matrix)
        if finite.all():
            self._counts += np.bincount(index.ravel(), minlength=n_slots)
            self._sums += matrix.sum(axis=0, dtype=np.float64)
        else:
            index[~finite] = n_slots  # an extra slot, dropped
            self._counts += np.bincount(index.ravel(), minlength=n_slots + 1)[:n_slots]
            self._sums += np.where(finite, matrix, 0.0).sum(axis=0, dtype=np.float64)

    def write(self) -> None:
        """With several workers: add what was observed since the last call to the files."""
        if self._files is None:
            return
        buckets, sums = self._files
        counts = self._counts
        filled = np.flatnonzero(counts)
        for i, count in zip(filled.tolist(), counts[filled].tolist(), strict=True):
            buckets[i].inc(count)
        for slot, total in zip(sums, self._sums.tolist(), strict=True):
            if total:
                slot.inc(total)
        counts[:] = 0
        self._sums[:] = 0.0

    def collect(self) -> Metric:
        """The family as ``prometheus_client``'s ``Histogram`` exposes one (one process)."""
        family = Metric(self.name, self.doc, "histogram")
        for (labels, les, offset), total in zip(self._series, self._sums.tolist(), strict=True):
            cumulative = np.cumsum(self._counts[offset : offset + len(les)]).tolist()
            for le, count in zip(les, cumulative, strict=True):
                family.add_sample(f"{self.name}_bucket", {**labels, "le": le}, float(count))
            family.add_sample(f"{self.name}_count", labels, float(cumulative[-1]))
            family.add_sample(f"{self.name}_sum", labels, total)
        return family


class Distributions:
    """The feature and prediction histograms of one server process, started once the model is
    known (:meth:`set`) and fed the answered rows in batches (:meth:`observe`). Registered in a
    one-process ``prometheus_client`` registry, it exposes them (:meth:`collect`); with several
    workers, :meth:`write` adds them to the worker's files instead.
    """

    def __init__(self) -> None:
        self.families: list[_Distribution] = []
        self.features: tuple[str, ...] | None = None
        self._feature_values: _Distribution | None = None
        self._prediction_values: _Distribution | None = None
        self._errors = 0

    def collect(self) -> Iterable[Metric]:
        return [family.collect() for family in self.families]

    def write(self) -> None:
        for family in self.families:
            family.write()

    def set(
        self,
        features: Sequence[str],
        profile: Mapping[str, Any] | None = None,
        max_features: int = DEFAULT_MAX_FEATURE_HISTOGRAMS,
    ) -> tuple[str, ...]:
        """Start the feature and prediction histograms (once per process).

        ``features``: the model's input columns, in the order of the rows given to
        :meth:`observe`; the first ``max_features`` get a histogram (a warning names the
        others). ``profile``: the training run's drift profile; a column's ``edges`` are its
        bucket bounds (the predictions': ``__prediction__``'s), :data:`GENERIC_VALUE_BUCKETS`
        for a column it lacks. Returns the features that have a histogram.
        """
        if self.features is not None:
            raise RuntimeError("the distributions are set once per process")
        features = tuple(features)
        kept = features[: max(0, max_features)]
        if len(kept) < len(features):
            left = features[len(kept) :]
            log.warning(
                "the model has %d input columns: feature histograms for the first %d only "
                "(--max-feature-histograms), none for %s%s", len(features), len(kept),
                ", ".join(left[:5]), f" and {len(left) - 5} more" if len(left) > 5 else "",
            )  # fmt: skip
        columns = profile.get("columns") if isinstance(profile, Mapping) else None
        columns = columns if isinstance(columns, Mapping) else {}
        profiled = []

        def bounds_of(column: str) -> tuple[float, ...]:
            entry = columns.get(column)
            bounds = bucket_bounds(entry.get("edges")) if isinstance(entry, Mapping) else None
            if bounds is None:
                return GENERIC_VALUE_BUCKETS
            profiled.append(column)
            return bounds

        families = []
        if kept:
            doc = "Values of the model's input features in answered requests, per feature."
            series = [(f, bounds_of(f)) for f in kept]
            self._feature_values = _Distribution(FEATURE_VALUE, doc, "feature", series)
            families.append(self._feature_values)
        doc = "The model's predictions in answered requests."
        series = [("", bounds_of(DRIFT_PROFILE_PREDICTION))]
        self._prediction_values = _Distribution(PREDICTION_VALUE, doc, None, series)
        families.append(self._prediction_values)
        self.families = families
        self.features = kept
        log.info(
            "histograms of %d features and the predictions; buckets from the drift profile "
            "for %d of them (%s), generic for %d", len(kept), len(profiled),
            ", ".join(profiled) or "none", len(kept) + 1 - len(profiled),
        )  # fmt: skip
        return kept

    def observe(self, samples: Iterable[tuple[Any, Any]]) -> None:
        """Answered rows and their predictions, as ``(rows, predictions)`` pairs (either may
        be None): ``rows`` a matrix (a float32 or float64 array) or a list of rows (lists of
        numbers) whose first columns are :attr:`features` in order, ``predictions`` a 1-D
        array or a list of numbers. Nothing happens before :meth:`set`."""
        predict = self._prediction_values
        if predict is None:
            return
        width = len(self.features or ())
        matrices: list[np.ndarray] = []
        listed: list[Any] = []
        arrays: list[np.ndarray] = []
        numbers: list[Any] = []
        for rows, outputs in samples:  # the lists are joined here, converted once below
            if rows is not None and width:
                if type(rows) is list:
                    listed += rows
                else:
                    matrices.append(rows)
            if outputs is not None:
                if type(outputs) is list:
                    numbers += outputs
                else:
                    arrays.append(outputs)
        try:
            features = self._feature_values
            if features is not None and (listed or matrices):
                if listed:
                    matrices.append(np.array(listed, dtype=np.float32))
                matrices = [m if m.shape[1] == width else m[:, :width] for m in matrices]
                features.observe(matrices[0] if len(matrices) == 1 else np.concatenate(matrices))
            if numbers:
                arrays.append(np.array(numbers, dtype=np.float64))
            if arrays:
                values = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
                predict.observe(values.reshape(-1, 1))
        except Exception:  # never let a bad sample stop the other metrics and the access log
            self._errors += 1
            if self._errors == 1:
                log.warning("could not record input distributions", exc_info=True)
