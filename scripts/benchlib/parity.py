"""The prediction check: each server's answers against the stock server's on the same model."""

from __future__ import annotations

from typing import Any


def numbers(obj: Any) -> list[float]:
    """All numbers of a predictions payload, in order ([{"prediction": x}] or [[x]] or [x])."""
    if isinstance(obj, dict):
        return [v for value in obj.values() for v in numbers(value)]
    if isinstance(obj, list):
        return [v for value in obj for v in numbers(value)]
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [float(obj)]
    return []


def predictions(url: str, columns: list[str], rows: list[list[float]]) -> list[float]:
    """Single-row requests, then one batch request; returns singles + batch values."""
    import httpx

    out: list[float] = []
    with httpx.Client(timeout=60) as client:
        for row in [*([r] for r in rows), rows]:
            resp = client.post(
                f"{url}/invocations",
                json={"dataframe_split": {"columns": columns, "data": row}},
            )
            resp.raise_for_status()
            out.extend(numbers(resp.json()["predictions"]))
    return out


def reference_of(label: str, running: dict[str, Any]) -> str | None:
    """The stock server whose predictions ``label``'s must equal (None: it is one)."""
    wanted = {
        "stock-tensorflow": "stock-pyfunc",  # the same network
        "this-server-tensorflow": "stock-tensorflow",
        "this-server-sklearn": "stock-sklearn",
        "stock-pyfunc": None,
        "stock-sklearn": None,
    }.get(label, "stock-pyfunc")
    return wanted if wanted in running and wanted != label else None
