"""The window as a stream of float64 matrices (features, then the target), never whole in memory.

- Holdout rows, and the training rows that validate, are chosen row by row from a stable hash
  of the row's values (:func:`row_hash`) and a seed: the same rows wherever, whenever and in
  whatever file layout or order they are read (champion and challenger are scored on the same
  rows), and equal rows on the same side. At most ``MAX_VALIDATION_ROWS`` validate (those with
  the smallest hash: a uniform sample).
- Normalization statistics come from one pass (:class:`RunningStats`, Chan et al.'s update).
- Training batches (:func:`training_batches`): fragments (a row group, a CSV file) in a seeded
  order, interleaved, shuffled in a pool of ``SHUFFLE_POOL_ROWS`` (all of the default window).

Pure NumPy and PyArrow; no TensorFlow, MLflow or Airflow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ml.settings import DataSettings

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

# Rows per record batch read from a file: bounded memory per reader, cheap per-batch overhead.
READ_BATCH_ROWS = 65_536
# Training rows are shuffled within a pool this large (the whole set when it fits).
SHUFFLE_POOL_ROWS = 262_144
# Fragments read at once when filling the pool, so one pool mixes several days.
INTERLEAVE = 4
MAX_VALIDATION_ROWS = 500_000
# Salts that keep the holdout, validation and sampling decisions independent of each other.
_HOLDOUT_SALT = 0x486F6C646F7574  # "Holdout"
_VALIDATION_SALT = 0x56616C6964  # "Valid"
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_CANONICAL_NAN = np.float64("nan").view(np.uint64)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: every input bit moves every output bit."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def row_hash(values: np.ndarray) -> np.ndarray:
    """A stable 64-bit hash of each row of a 2-D float array (the values, not their storage:
    an int 3 and a float 3.0 hash alike; -0.0 as 0.0; every NaN alike)."""
    values = np.asarray(values, dtype="float64")
    if values.ndim != 2:
        raise ValueError(f"expected a 2-D array of rows, got shape {values.shape}")
    bits = np.ascontiguousarray(values + 0.0).view(np.uint64)  # + 0.0 turns -0.0 into 0.0
    nan = np.isnan(values)
    if nan.any():
        bits = np.where(nan, _CANONICAL_NAN, bits)
    with np.errstate(over="ignore"):
        h = np.full(values.shape[0], np.uint64(values.shape[1]) * _GOLDEN, dtype=np.uint64)
        for column in range(values.shape[1]):
            h = _mix(h ^ bits[:, column]) + _GOLDEN
    return h


def unit(hashes: np.ndarray, salt: int, seed: int) -> np.ndarray:
    """Each hash, salted with (``salt``, ``seed``), as a uniform number in [0, 1)."""
    key = np.uint64((salt * 0x100000001B3 + int(seed) * 0x2545F4914F6CDD1D) % (1 << 64))
    with np.errstate(over="ignore"):
        mixed = _mix(hashes ^ _mix(np.array([key], dtype=np.uint64))[0])
    return (mixed >> np.uint64(11)).astype("float64") * (1.0 / (1 << 53))


def holdout_mask(hashes: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which rows are holdout (about ``fraction`` of them, the same ones for the same seed)."""
    return unit(hashes, _HOLDOUT_SALT, seed) < fraction


def holdout_rank(hashes: np.ndarray, seed: int) -> np.ndarray:
    """The holdout decision's uniform number: holdout rows with the smallest are a uniform
    sample of the holdout (what evaluation profiles and plots)."""
    return unit(hashes, _HOLDOUT_SALT, seed)


def validation_rank(hashes: np.ndarray, seed: int) -> np.ndarray:
    return unit(hashes, _VALIDATION_SALT, seed)


class RunningStats:
    """Count, mean and population variance per column, merged batch by batch."""

    def __init__(self, columns: int):
        self.n = 0
        self.mean = np.zeros(columns)
        self.m2 = np.zeros(columns)

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype="float64")
        count = values.shape[0]
        if count == 0:
            return
        mean = values.mean(axis=0)
        m2 = ((values - mean) ** 2).sum(axis=0)
        total = self.n + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * count / total)
        self.n = total

    @property
    def variance(self) -> np.ndarray:
        return self.m2 / self.n if self.n else np.zeros_like(self.m2)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.variance)


class BottomK:
    """The ``k`` rows with the smallest rank seen so far (a uniform sample when ranks are
    uniform hashes), kept with their position in the stream."""

    def __init__(self, k: int):
        self.k = k
        self._ranks: list[np.ndarray] = []
        self._rows: list[np.ndarray] = []
        self._positions: list[np.ndarray] = []
        self._size = 0
        self.bound = np.inf  # ranks at or above this can no longer enter

    def add(self, ranks: np.ndarray, rows: np.ndarray, positions: np.ndarray) -> None:
        keep = ranks < self.bound
        if not keep.any():
            return
        self._ranks.append(ranks[keep])
        self._rows.append(rows[keep])
        self._positions.append(positions[keep])
        self._size += int(keep.sum())
        if self._size > 2 * self.k + READ_BATCH_ROWS:
            self._prune()

    def _prune(self) -> None:
        ranks, rows, positions = self._concat()
        if len(ranks) > self.k + 1:
            # Keep k + 1: the (k+1)-th smallest rank is the threshold below which k rows lie.
            kept = np.argpartition(ranks, self.k)[: self.k + 1]
            ranks, rows, positions = ranks[kept], rows[kept], positions[kept]
            self.bound = float(ranks.max())
        self._ranks, self._rows, self._positions = [ranks], [rows], [positions]
        self._size = len(ranks)

    def _concat(self):
        if not self._ranks:
            return np.empty(0), np.empty((0, 0)), np.empty(0, dtype=np.int64)
        return tuple(np.concatenate(x) for x in (self._ranks, self._rows, self._positions))

    def result(self) -> tuple[np.ndarray, float]:
        """(rows in stream order, threshold): the rows are exactly those ranked below the
        threshold (``inf`` when fewer than ``k + 1`` rows were offered)."""
        self._prune()
        ranks, rows, positions = self._concat()
        threshold = np.inf
        if len(ranks) > self.k:
            order = np.argsort(ranks, kind="stable")
            threshold = float(ranks[order[self.k]])
            chosen = ranks < threshold
            ranks, rows, positions = ranks[chosen], rows[chosen], positions[chosen]
        in_stream_order = np.argsort(positions, kind="stable")
        return rows[in_stream_order], threshold


@dataclass(frozen=True)
class Fragment:
    """A piece of a source read on its own: a parquet row group, a CSV file, a frame slice."""

    source: str
    index: int


class Source:
    """Rows of (features..., target) as float64 matrices, fragment by fragment."""

    columns: list[str]

    def fragments(self) -> list[Fragment]:
        raise NotImplementedError

    def read_raw(self, fragment: Fragment, dtype: str = "float64") -> Iterator[np.ndarray]:
        """Every row of the fragment (before :meth:`keep`), in the same batches every time."""
        raise NotImplementedError

    def keep(self, hashes: np.ndarray) -> np.ndarray | None:
        """Which of the rows with ``hashes`` belong to this source (None: all)."""
        return None

    def hashed(self, fragment: Fragment) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The fragment's rows as (values, row hashes)."""
        for values in self.read_raw(fragment):
            hashes = row_hash(values)
            keep = self.keep(hashes)
            if keep is not None:
                values, hashes = values[keep], hashes[keep]
            if len(values):
                yield values, hashes

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every row in order, as (values, row hashes)."""
        for fragment in self.fragments():
            yield from self.hashed(fragment)


class FrameSource(Source):
    """An in-memory frame (tests, callers that already hold their rows) as a source."""

    def __init__(self, frame: pd.DataFrame, columns: Sequence[str]):
        self.columns = list(columns)
        self._values = frame[self.columns].to_numpy(dtype="float64")

    def fragments(self) -> list[Fragment]:
        count = max(1, -(-len(self._values) // READ_BATCH_ROWS))
        return [Fragment("frame", i) for i in range(count)]

    def read_raw(self, fragment: Fragment, dtype: str = "float64") -> Iterator[np.ndarray]:
        start = fragment.index * READ_BATCH_ROWS
        yield self._values[start : start + READ_BATCH_ROWS].astype(dtype, copy=False)


class WindowSource(Source):
    """The ``columns`` of the window's files (``uris``: parquet or CSV, local or any fsspec
    URL), streamed; with ``part`` "train" or "holdout", only the rows on that side of the
    holdout split. (``ml.data.window_source`` makes one from partitions and a schema.)"""

    def __init__(
        self, uris: Sequence[str], columns: Sequence[str], settings: DataSettings, part=None
    ):
        if part not in (None, "train", "holdout"):
            raise ValueError(f"part must be None, 'train' or 'holdout', got {part!r}")
        self.uris = list(uris)
        self.columns = list(columns)
        self.settings = settings
        self.part = part
        self._fragments: list[Fragment] | None = None

    def fragments(self) -> list[Fragment]:
        if self._fragments is None:
            found = []
            for uri in self.uris:
                groups = 1
                if self.settings.format == "parquet":
                    with open_binary(uri) as handle:
                        groups = parquet_file(handle).metadata.num_row_groups
                found += [Fragment(uri, i) for i in range(max(groups, 1))]
            self._fragments = found
        return self._fragments

    def read_raw(self, fragment: Fragment, dtype: str = "float64") -> Iterator[np.ndarray]:
        return read_values(fragment, self.columns, self.settings.format, dtype)

    def keep(self, hashes: np.ndarray) -> np.ndarray | None:
        if self.part is None:
            return None
        holdout = holdout_mask(hashes, self.settings.holdout_fraction, self.settings.split_seed)
        return holdout if self.part == "holdout" else ~holdout


def open_binary(uri: str):
    """``uri`` (a path or any fsspec URL) opened for reading bytes, as a context manager."""
    import fsspec

    return fsspec.open(uri, "rb")


def parquet_file(handle):
    """A parquet reader on an open file that reads row groups and columns as asked."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(handle, pre_buffer=False)


def read_values(
    fragment: Fragment, columns: list[str], file_format: str, dtype: str = "float64"
) -> Iterator[np.ndarray]:
    """The fragment's ``columns`` as ``dtype`` matrices of at most ``READ_BATCH_ROWS`` rows."""
    if file_format == "parquet":
        with open_binary(fragment.source) as handle:
            reader = parquet_file(handle)
            for batch in reader.iter_batches(
                batch_size=READ_BATCH_ROWS, row_groups=[fragment.index], columns=columns
            ):
                yield _matrix([batch.column(name) for name in columns], dtype)
        return
    with open_binary(fragment.source) as handle:
        for chunk in text_chunks(handle, file_format, columns):
            yield chunk[columns].to_numpy(dtype=dtype)


def text_chunks(handle, file_format: str, columns: list[str] | None = None):
    """A CSV or JSON-lines file (the slim model server's payload log) as frames of at most
    ``READ_BATCH_ROWS`` rows (CSV: only ``columns``); no column is read as a date."""
    import pandas as pd

    if file_format == "jsonl":
        return pd.read_json(handle, lines=True, chunksize=READ_BATCH_ROWS, convert_dates=False)
    return pd.read_csv(handle, chunksize=READ_BATCH_ROWS, usecols=columns)


def _matrix(arrays: list[Any], dtype: str) -> np.ndarray:
    out = np.empty((len(arrays[0]) if arrays else 0, len(arrays)), dtype=dtype)
    for i, array in enumerate(arrays):
        out[:, i] = array.to_numpy(zero_copy_only=False)
    return out


@dataclass
class TrainingData:
    """What one streaming pass over the training rows found: counts, scaling statistics, the
    validation rows and the rank below which a row validates."""

    train_rows: int
    validation_x: np.ndarray
    validation_y: np.ndarray
    validation_threshold: float
    feature_mean: np.ndarray
    feature_variance: np.ndarray
    target_mean: float
    target_std: float

    @property
    def validation_rows(self) -> int:
        return len(self.validation_y)


def prepare_training(
    source: Source, validation_fraction: float, seed: int, max_validation_rows: int
) -> TrainingData:
    """One pass: count the rows, compute the scaling statistics on the training rows and
    collect the validation rows (at most ``max_validation_rows``)."""
    features = len(source.columns) - 1
    stats = RunningStats(len(source.columns))
    validation = BottomK(max_validation_rows)
    total, bad = 0, set()
    for values, hashes in source.batches():
        finite = np.isfinite(values)
        if not finite.all():
            bad |= {source.columns[i] for i in np.flatnonzero(~finite.all(axis=0))}
            continue
        rank = validation_rank(hashes, seed)
        candidate = rank < validation_fraction
        positions = np.arange(total, total + len(values))
        validation.add(rank[candidate], values[candidate], positions[candidate])
        # Statistics from rows certain to train (a capped validation set trains the rest).
        stats.update(values[~candidate])
        total += len(values)
    if bad:
        raise ValueError(f"columns contain missing values: {sorted(bad)}")
    rows, threshold = validation.result()
    threshold = min(threshold, validation_fraction)
    rows = rows.reshape(-1, len(source.columns))
    train_rows = total - len(rows)
    if len(rows) == 0 or train_rows == 0 or stats.n == 0:
        split = f"{total} rows give {train_rows} training and {len(rows)} validation rows"
        raise ValueError(
            f"{split}: both need at least one (more rows, or another validation_fraction)"
        )
    target_std = float(stats.std[-1])
    return TrainingData(
        train_rows=train_rows,
        validation_x=rows[:, :features].astype("float32"),
        validation_y=rows[:, features].astype("float32"),
        validation_threshold=threshold,
        feature_mean=stats.mean[:features],
        feature_variance=stats.variance[:features],
        target_mean=float(stats.mean[-1]),
        # A constant target would make the rescale a no-op; 1.0 keeps the net trainable.
        target_std=target_std if target_std > 0 else 1.0,
    )


def training_batches(
    source: Source, data: TrainingData, seed: int, batch_size: int
) -> Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]:
    """A generator function: each call is one epoch of shuffled (x, y) float32 batches of
    ``batch_size`` rows (the last one smaller) over the training rows only.

    The first epoch hashes each row to tell training rows from holdout and validation ones
    and keeps the answer as one bit per row; later epochs read float32 and reuse the bits.
    """
    features = len(source.columns) - 1
    epoch = [0]
    masks: dict[Fragment, list[np.ndarray]] = {}

    def _rows(fragment: Fragment) -> Iterator[np.ndarray]:
        cached = masks.get(fragment)
        if cached is not None:
            for values, packed in zip(source.read_raw(fragment, "float32"), cached, strict=True):
                train = np.unpackbits(packed, count=len(values)).view(bool)
                if train.any():
                    yield values[train]
            return
        bits = []
        for values in source.read_raw(fragment):
            hashes = row_hash(values)
            train = validation_rank(hashes, seed) >= data.validation_threshold
            keep = source.keep(hashes)
            if keep is not None:
                train &= keep
            bits.append(np.packbits(train))
            if train.any():
                yield values[train].astype("float32")
        masks[fragment] = bits  # only once the fragment was read to its end

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rng = np.random.default_rng([seed, epoch[0]])
        epoch[0] += 1
        order = [source.fragments()[i] for i in rng.permutation(len(source.fragments()))]
        pending = iter(order)
        active: list[Iterator[np.ndarray]] = []
        pool: list[np.ndarray] = []
        pooled = 0
        while True:
            while len(active) < INTERLEAVE and (fragment := next(pending, None)) is not None:
                active.append(_rows(fragment))
            if not active:
                break
            pick = int(rng.integers(len(active)))
            chunk = next(active[pick], None)
            if chunk is None:
                active.pop(pick)
                continue
            pool.append(chunk)
            pooled += len(chunk)
            if pooled >= SHUFFLE_POOL_ROWS:
                rest = yield from _emit(np.concatenate(pool), rng, batch_size, features, last=False)
                pool, pooled = [rest], len(rest)
        if pooled:
            yield from _emit(np.concatenate(pool), rng, batch_size, features, last=True)

    return generate


def _emit(rows: np.ndarray, rng, batch_size: int, features: int, *, last: bool):
    """Yield ``rows`` shuffled as full batches (and with ``last`` the remainder too); return
    what is left over for the next pool."""
    order = rng.permutation(len(rows))
    full = len(rows) - len(rows) % batch_size
    for start in range(0, full, batch_size):
        batch = rows[order[start : start + batch_size]]
        yield np.ascontiguousarray(batch[:, :features]), np.ascontiguousarray(batch[:, features])
    rest = rows[order[full:]]
    if last:
        if len(rest):
            yield np.ascontiguousarray(rest[:, :features]), np.ascontiguousarray(rest[:, features])
        return rest[:0]
    return rest
