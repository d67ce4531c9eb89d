"""Just enough PromQL reading for tests: the series names a query selects.

Not a parser (promtool parses: tests/serving/deploy/test_dashboard.py); it relies on the
queries being valid and reads only names outside strings, label matchers, range brackets and
grouping label lists that are not followed by ``(`` (functions, aggregations) or keywords.
"""

from __future__ import annotations

import re

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "atan2", "inf", "nan",
}  # fmt: skip
# What Grafana substitutes before a query reaches Prometheus, with values that parse.
GRAFANA_MACROS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
}


def grafana_to_promql(expr: str, variables: dict[str, str] | None = None) -> str:
    """``expr`` as Prometheus would get it: Grafana's macros and ``variables`` substituted."""
    for macro, value in {**GRAFANA_MACROS, **(variables or {})}.items():
        expr = expr.replace(macro, value)
    return expr


def series_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects (``foo{...}``, ``foo[5m]``, bare ``foo``)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group()
        after = re.sub(r"^(by|without)\b\s*", "", text[match.end() :].lstrip())
        if word.lower() in _KEYWORDS or after.startswith("("):  # a keyword, a function
            continue
        names.add(word)
    return names


def selected_labels(expr: str) -> dict[str, set[str]]:
    """``{series: label names its matchers use}`` for the ``series{...}`` selectors of
    ``expr``."""
    labels: dict[str, set[str]] = {}
    for name, matchers in re.findall(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\}", expr):
        found = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers)
        labels.setdefault(name, set()).update(found)
    return labels
