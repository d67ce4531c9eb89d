"""Strict mode (``--strict``): what MLflow quietly coerces or drops is a 400 naming the column.

JSON is checked as decoded, before any parsing (:meth:`StrictInputs.payload_problem`); CSV and
Parquet after MLflow's parsing, before the model runs (:meth:`StrictInputs.frame_problem`).
"""

from __future__ import annotations

import itertools
from typing import Any

from serving.server.contract import is_numeric_column
from serving.server.protocol import payload_format
from serving.server.replies import Reply, error_reply, invalid_input_fields

_NUMBER_TYPES = (int, float)  # exact types: type(True) is bool, not int
_NUMBER_OR_NULL = frozenset({int, float, type(None)})
_MAX_NAMED = 5
_MAX_LISTED = 20


def _label(column: Any) -> str:
    text = repr(column)
    return text if len(text) <= 80 else text[:77] + "..."


_KINDS = {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}


def _kind_of(value: Any) -> str:
    return _KINDS.get(type(value), f"a {type(value).__name__}")


class StrictInputs:
    """Stock MLflow drops columns that are not in the model's input schema and converts what it
    can to the schema's types (a JSON ``true`` in a numeric column becomes 1.0, ``"2.5"`` 2.5).
    Strict mode answers 400 instead, naming the column: for a column not in the schema, and
    for a value of a numeric schema column that is not a JSON number (``null`` is a missing
    value, judged as without strict mode). Only a schema of named columns can be checked
    against; a payload whose shape MLflow rejects anyway is left to MLflow (and its error).
    """

    __slots__ = ("_all_numeric", "_expected", "_order", "columns", "numeric")

    def __init__(self, columns: list[str], numeric: list[str]) -> None:
        self.columns = frozenset(columns)
        self.numeric = frozenset(numeric)
        self._order = list(columns)
        self._all_numeric = self.numeric == self.columns  # the Keras model's case
        shown = columns[:_MAX_LISTED]
        self._expected = ", ".join(shown) + (", ..." if len(columns) > len(shown) else "")

    @classmethod
    def from_schema(cls, schema: Any) -> StrictInputs | None:
        """From an MLflow input schema; None without one or without column names."""
        if schema is None or not schema.has_input_names():
            return None
        specs = schema.inputs
        return cls([s.name for s in specs], [s.name for s in specs if is_numeric_column(s)])

    def payload_problem(self, payload: Any) -> str | None:
        """What is wrong with a decoded JSON request, or None (also: MLflow decides)."""
        if type(payload) is not dict:
            return None
        fmt = payload_format(payload, allow_params=True, ignore_other_keys=True)
        if fmt is None:
            return None
        value = payload[fmt]
        if fmt == "dataframe_split":
            return self._split_problem(value) if type(value) is dict else None
        if type(value) is list:  # records (instances/inputs as a list of objects, too)
            return self._records_problem(value)
        if type(value) is dict and fmt != "dataframe_records":  # columns: {name: values}
            return self._columns_problem(value)
        return None

    def frame_problem(self, frame: Any) -> str | None:
        """What is wrong with a parsed CSV or Parquet request (a DataFrame), or None."""
        columns = list(getattr(frame, "columns", ()))
        if problem := self._unknown(columns):
            return problem
        for column, dtype in frame.dtypes.items():
            if column in self.numeric and dtype.kind not in "iuf":
                got = "booleans" if dtype.kind == "b" else f"non-numeric values ({dtype})"
                return self._not_a_number(column, got)
        return None

    def _split_problem(self, split: dict) -> str | None:
        columns, data = split.get("columns"), split.get("data")
        if type(columns) is not list:
            return None
        if columns != self._order and (problem := self._unknown(columns)):
            return problem
        if type(data) is not list:
            return None
        if self._all_numeric:  # the common case, in one pass in C; below: which column
            try:
                if _NUMBER_OR_NULL.issuperset(map(type, itertools.chain.from_iterable(data))):
                    return None
            except TypeError:  # a row that is not a list
                pass
        numeric = self.numeric
        checks = [(i, column) for i, column in enumerate(columns) if column in numeric]
        for row in data:
            if type(row) is not list:
                return None
            for i, column in checks:
                if i < len(row):
                    value = row[i]
                    if type(value) not in _NUMBER_TYPES and value is not None:
                        return self._not_a_number(column, _kind_of(value))
        return None

    def _records_problem(self, records: list) -> str | None:
        columns, numeric, all_numeric = self.columns, self.numeric, self._all_numeric
        for record in records:
            if type(record) is not dict:
                return None
            if not columns.issuperset(record):
                return self._unknown(list(record))
            if all_numeric and _NUMBER_OR_NULL.issuperset(map(type, record.values())):
                continue
            for column in numeric:
                value = record.get(column)
                if type(value) not in _NUMBER_TYPES and value is not None:
                    return self._not_a_number(column, _kind_of(value))
        return None

    def _columns_problem(self, values_by_column: dict) -> str | None:
        if not self.columns.issuperset(values_by_column):
            return self._unknown(list(values_by_column))
        for column in self.numeric:
            values = values_by_column.get(column)
            for value in values if type(values) is list else (values,):
                if type(value) not in _NUMBER_TYPES and value is not None:
                    return self._not_a_number(column, _kind_of(value))
        return None

    def _unknown(self, names: list) -> str | None:
        columns = self.columns
        unknown = [n for n in names if type(n) is not str or n not in columns]
        if not unknown:
            return None
        listed = ", ".join(_label(n) for n in unknown[:_MAX_NAMED])
        if len(unknown) > _MAX_NAMED:
            listed += f" and {len(unknown) - _MAX_NAMED} more"
        which = f"columns {listed} are" if len(unknown) > 1 else f"column {listed} is"
        return (f"Invalid input (strict mode): {which} not in the model's input schema "
                f"({self._expected}). Send only the schema's columns.")  # fmt: skip

    @staticmethod
    def _not_a_number(column: str, got: str) -> str:
        return (f"Invalid input (strict mode): column {_label(column)} takes numbers, got {got}. "
                "Booleans and strings are not converted to numbers.")  # fmt: skip


def strict_reply(problem: str) -> Reply:
    return error_reply(400, "BAD_REQUEST", problem, extra=invalid_input_fields())
