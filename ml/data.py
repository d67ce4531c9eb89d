"""Training data: daily partitions, their validation, the holdout split.

Partitions are laid out as ``<path>/date=YYYY-MM-DD/*.<format>`` (parquet, csv, or jsonl:
JSON lines, what the slim model server's payload log writes) under a local folder or
any fsspec URL (``s3://``, ``gs://``, ``file://``, ``memory://``). A run reads the
``window_days`` dates that end at its data interval end (exclusive), validates every file
against a :class:`~ml.schema.DataSchema` (:mod:`ml.schema`), and hashes the exact bytes it
trained on so the model version can name its data.

The built-in synthetic source (``source="synthetic"``, :mod:`ml.synthetic`) writes the same
kind of partitions.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import fsspec
import numpy as np
import pandas as pd

from ml import stream
from ml.schema import ColumnSpec, DataSchema
from ml.settings import DataSettings

log = logging.getLogger(__name__)

# Whole-partition and whole-window rules have no single column; they use this marker.
ALL_COLUMNS = "*"
ALL_PARTITIONS = "*"

# Read files in chunks when hashing so a large partition never sits in memory twice.
_HASH_CHUNK_BYTES = 1 << 20


class DataNotFoundError(Exception):
    """No partition exists for the requested window."""


@dataclass(frozen=True)
class Violation:
    partition: str
    column: str
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.partition}: column '{self.column}' failed rule '{self.rule}': {self.detail}"


class DataValidationError(ValueError):
    """The data broke one or more rules; ``violations`` lists every one of them."""

    def __init__(self, violations: list[Violation]):
        self.violations = list(violations)
        lines = "\n".join(f"  {v}" for v in self.violations)
        super().__init__(f"{len(self.violations)} data validation violation(s):\n{lines}")


# --------------------------------------------------------------------------- partitions


@dataclass(frozen=True)
class Partition:
    day: date
    uri: str  # a local path or fsspec URL of one file


def window_days(end: date, days: int) -> list[date]:
    """The ``days`` dates in ``[end - days, end)``; ``end`` is exclusive like Airflow's
    data interval end."""
    if days < 1:
        raise ValueError(f"a window needs at least one day, got {days}")
    # datetime is a date subclass; its arithmetic would keep the time, so drop it.
    if isinstance(end, datetime):
        end = end.date()
    return [end - timedelta(days=offset) for offset in range(days, 0, -1)]


def _filesystem(settings: DataSettings) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(settings.path)
    return fs, root.rstrip("/")


def _day_dir(root: str, day: date) -> str:
    return f"{root}/date={day.isoformat()}"


def _is_data_file(path: str, file_format: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    # Hidden and underscore files are writers' bookkeeping (_SUCCESS, .crc, temp files).
    return name.endswith(f".{file_format}") and not name.startswith((".", "_"))


def _day_files(fs: fsspec.AbstractFileSystem, root: str, day: date, file_format: str) -> list[str]:
    found = fs.glob(f"{_day_dir(root, day)}/*.{file_format}")
    return sorted(path for path in found if _is_data_file(path, file_format))


def _to_uri(fs: fsspec.AbstractFileSystem, settings: DataSettings, path: str) -> str:
    # Keep the caller's style: plain paths stay plain, URLs keep their protocol.
    return fs.unstrip_protocol(path) if "://" in settings.path else path


def discover_partitions(settings: DataSettings, days: list[date]) -> list[Partition]:
    """Every ``<path>/date=YYYY-MM-DD/*.<format>`` file for ``days``, sorted by day and name.

    Days without files are skipped with a warning; a window with no files at all raises
    :class:`DataNotFoundError`.
    """
    fs, root = _filesystem(settings)
    fs.invalidate_cache()  # object stores cache listings; a writer may have just added files
    partitions: list[Partition] = []
    missing: list[date] = []
    for day in sorted(days):
        files = _day_files(fs, root, day, settings.format)
        if not files:
            missing.append(day)
        partitions.extend(Partition(day, _to_uri(fs, settings, path)) for path in files)

    window = f"{min(days)}..{max(days)}" if days else "(empty window)"
    if not partitions:
        raise DataNotFoundError(
            f"no {settings.format} partitions under {settings.path} for the window {window} "
            f"({len(days)} days); expected files at "
            f"{settings.path}/date=YYYY-MM-DD/*.{settings.format}"
        )
    if missing:
        log.warning(
            "skipping %d day(s) without %s partitions under %s: %s",
            len(missing),
            settings.format,
            settings.path,
            ", ".join(day.isoformat() for day in missing),
        )
    return partitions


def _relative_name(uri: str) -> str:
    # "date=YYYY-MM-DD/<file>": the same data copied to another root hashes the same.
    return "/".join(uri.rstrip("/").split("/")[-2:])


def partitions_digest(partitions: list[Partition]) -> str:
    """sha256 over each file's relative name and bytes, in order: same data, same digest."""
    digest = hashlib.sha256()
    for partition in partitions:
        file_digest = hashlib.sha256()
        with fsspec.open(partition.uri, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK_BYTES):
                file_digest.update(chunk)
        # Name and a fixed-size per-file digest: no two file lists can collide by shifting
        # bytes from one file into the next.
        digest.update(_relative_name(partition.uri).encode("utf-8") + b"\0")
        digest.update(file_digest.digest())
    return digest.hexdigest()


def read_partition(partition: Partition, settings: DataSettings) -> pd.DataFrame:
    """One partition file as a frame; any failure to parse it is a 'readable' violation."""
    try:
        with fsspec.open(partition.uri, "rb") as handle:
            if settings.format == "parquet":
                return pd.read_parquet(handle)
            return pd.concat(stream.text_chunks(handle, settings.format), ignore_index=True)
    except Exception as exc:  # the readers raise many types; all mean "cannot read it"
        raise DataValidationError(
            [Violation(partition.uri, ALL_COLUMNS, "readable", f"{type(exc).__name__}: {exc}")]
        ) from exc


# --------------------------------------------------------------------------- validation


@dataclass
class ValidationReport:
    rows_per_partition: dict[str, int]
    total_rows: int
    columns: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_per_partition": dict(self.rows_per_partition),
            "total_rows": self.total_rows,
            "columns": list(self.columns),
        }


def _structure_violations(uri: str, frame: pd.DataFrame, schema: DataSchema) -> list[Violation]:
    """Columns present and numeric: what building a float frame needs."""
    return _dtype_violations(uri, {str(c): frame[c].dtype for c in frame.columns}, schema)


def _dtype_violations(uri: str, dtypes: dict[str, Any], schema: DataSchema) -> list[Violation]:
    violations = []
    for spec in schema.columns:
        if spec.name not in dtypes:
            present = ", ".join(dtypes) or "none"
            violations.append(
                Violation(uri, spec.name, "schema", f"missing (columns present: {present})")
            )
        elif not pd.api.types.is_numeric_dtype(dtype := dtypes[spec.name]):
            violations.append(Violation(uri, spec.name, "type", f"dtype {dtype}, expected numeric"))
    return violations


def _arrow_dtype(arrow_type: Any) -> Any:
    """The pandas dtype a column of ``arrow_type`` reads as (what the type rule judges)."""
    try:
        return np.dtype(arrow_type.to_pandas_dtype())
    except (NotImplementedError, TypeError):
        return np.dtype(object)


class _ColumnCheck:
    """Nulls and ranges of one column, counted batch by batch."""

    def __init__(self, spec: ColumnSpec):
        self.spec = spec
        self.nulls = self.infinite = self.below = self.above = 0
        self.min_seen = math.inf
        self.max_seen = -math.inf

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype="float64")
        nan = np.isnan(values)
        self.nulls += int(nan.sum())
        infinite = np.isinf(values)
        self.infinite += int(infinite.sum())
        present = values[~(nan | infinite)]
        if self.spec.min is not None:
            below = present[present < self.spec.min]
            if below.size:
                self.below += below.size
                self.min_seen = min(self.min_seen, float(below.min()))
        if self.spec.max is not None:
            above = present[present > self.spec.max]
            if above.size:
                self.above += above.size
                self.max_seen = max(self.max_seen, float(above.max()))

    def violations(self, uri: str) -> list[Violation]:
        spec, found = self.spec, []
        if self.nulls and not spec.nullable:
            found.append(Violation(uri, spec.name, "nulls", f"{self.nulls} nulls"))
        if self.infinite:
            # No range makes inf a usable training value, declared or not.
            found.append(Violation(uri, spec.name, "range", f"{self.infinite} infinite values"))
        if self.below:
            found.append(
                Violation(
                    uri,
                    spec.name,
                    "range",
                    f"{self.below} values below min {spec.min} (min seen {self.min_seen:g})",
                )
            )
        if self.above:
            found.append(
                Violation(
                    uri,
                    spec.name,
                    "range",
                    f"{self.above} values above max {spec.max} (max seen {self.max_seen:g})",
                )
            )
        return found


def _partition_violations(
    partition: Partition, schema: DataSchema, settings: DataSettings
) -> tuple[int, list[Violation]]:
    """(rows, violations) of one partition, read a record batch at a time."""
    uri = partition.uri
    rows = 0
    broken: set[str] = set()
    structure: list[Violation] = []
    checks: dict[str, _ColumnCheck] = {}
    with stream.open_binary(uri) as handle:
        if settings.format == "parquet":
            reader = stream.parquet_file(handle)
            arrow = reader.schema_arrow
            dtypes = {name: _arrow_dtype(arrow.field(name).type) for name in arrow.names}
            structure = _dtype_violations(uri, dtypes, schema)
            broken = {v.column for v in structure}
            checks = {s.name: _ColumnCheck(s) for s in schema.columns if s.name not in broken}
            rows = reader.metadata.num_rows
            if checks:
                for batch in reader.iter_batches(
                    batch_size=stream.READ_BATCH_ROWS, columns=list(checks)
                ):
                    for name, check in checks.items():
                        check.update(batch.column(name).to_numpy(zero_copy_only=False))
        else:
            for chunk in stream.text_chunks(handle, settings.format):
                # A text value anywhere makes its chunk's column non-numeric: type violation.
                for violation in _structure_violations(uri, chunk, schema):
                    if violation.column not in broken:
                        broken.add(violation.column)
                        structure.append(violation)
                for spec in schema.columns:
                    if spec.name not in broken:
                        check = checks.setdefault(spec.name, _ColumnCheck(spec))
                        check.update(chunk[spec.name].to_numpy(dtype="float64"))
                rows += len(chunk)
            order = {spec.name: i for i, spec in enumerate(schema.columns)}
            structure.sort(key=lambda v: order.get(v.column, len(order)))
    violations = list(structure)
    for spec in schema.columns:
        if spec.name not in broken and spec.name in checks:
            violations.extend(checks[spec.name].violations(uri))
    if rows < settings.min_rows_per_partition:
        violations.append(
            Violation(
                uri,
                ALL_COLUMNS,
                "min_rows",
                f"{rows} rows, need at least {settings.min_rows_per_partition}",
            )
        )
    return rows, violations


def validate_partitions(
    partitions: list[Partition], schema: DataSchema, settings: DataSettings
) -> ValidationReport:
    """Check every partition against ``schema`` and the row minimums, streamed: a record
    batch at a time, never a whole partition in memory.

    All violations across all partitions are collected first, so one run shows everything
    that is wrong; then :class:`DataValidationError` lists them.
    """
    violations: list[Violation] = []
    rows: dict[str, int] = {}
    for partition in partitions:
        try:
            count, found = _partition_violations(partition, schema, settings)
        except Exception as exc:  # the readers raise many types; all mean "cannot read it"
            violations.append(
                Violation(partition.uri, ALL_COLUMNS, "readable", f"{type(exc).__name__}: {exc}")
            )
            continue
        rows[partition.uri] = count
        violations.extend(found)

    total = sum(rows.values())
    if total < settings.min_rows_total:
        violations.append(
            Violation(
                ALL_PARTITIONS,
                ALL_COLUMNS,
                "min_rows_total",
                f"{total} rows across {len(rows)} readable partition(s), "
                f"need at least {settings.min_rows_total}",
            )
        )
    if violations:
        raise DataValidationError(violations)
    return ValidationReport(
        rows_per_partition=rows,
        total_rows=total,
        columns=[spec.name for spec in schema.columns],
    )


def read_frame(
    partitions: list[Partition], schema: DataSchema, settings: DataSettings
) -> pd.DataFrame:
    """All partitions as one float64 frame holding only the schema's columns, in schema
    order (features, then target)."""
    if not partitions:
        raise DataNotFoundError("no partitions to read")
    columns = [spec.name for spec in schema.columns]
    frames = []
    for partition in partitions:
        frame = read_partition(partition, settings)
        # Re-checked here so a frame can never silently lose a column or coerce strings.
        violations = _structure_violations(partition.uri, frame, schema)
        if violations:
            raise DataValidationError(violations)
        frames.append(frame[columns].astype("float64"))
    return pd.concat(frames, ignore_index=True)


def split_holdout(
    frame: pd.DataFrame, holdout_fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, holdout) of a frame in memory, by the same per-row hash as the streamed
    window (``ml.stream.holdout_mask``): about ``holdout_fraction`` of the rows, the same
    rows for the same seed however the rows are ordered or stored, so challenger and
    champion are scored on identical rows."""
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    if len(frame) < 2:
        raise ValueError(f"need at least 2 rows to split, got {len(frame)}")
    values = frame.apply(pd.to_numeric, errors="coerce").to_numpy(dtype="float64")
    holdout = stream.holdout_mask(stream.row_hash(values), holdout_fraction, seed)
    if holdout.all() or not holdout.any():
        raise ValueError(
            f"{len(frame)} rows split by a holdout_fraction of {holdout_fraction} leave one "
            "side empty: more rows are needed"
        )
    return (
        frame[~holdout].reset_index(drop=True),
        frame[holdout].reset_index(drop=True),
    )


def window_source(
    partitions: list[Partition], schema: DataSchema, settings: DataSettings, part: str | None
) -> stream.WindowSource:
    """The window's rows (``part``: "train", "holdout" or None for all) as an
    ``ml.stream.WindowSource``: read a record batch at a time."""
    if not partitions:
        raise DataNotFoundError("no partitions to read")
    columns = [spec.name for spec in schema.columns]
    return stream.WindowSource([p.uri for p in partitions], columns, settings, part)


__all__ = [
    "ALL_COLUMNS",
    "ALL_PARTITIONS",
    "DataNotFoundError",
    "DataValidationError",
    "Partition",
    "ValidationReport",
    "Violation",
    "discover_partitions",
    "partitions_digest",
    "read_frame",
    "read_partition",
    "split_holdout",
    "validate_partitions",
    "window_days",
    "window_source",
]
