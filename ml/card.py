"""What a person reads about a version, as Markdown (pure: no I/O).

* :func:`evidence`: the body of the approval form (Airflow's Required Actions): the gate's
  deltas against ``@champion`` on the same holdout, the bars, the newest drift scores, links.
* :func:`model_card`: the version's description in the registry (the MLflow UI renders it),
  rendered again from the version's tags whenever the pipeline writes one (``ml.registry``):
  data window and digest, code version, the gate's deltas, the approval, the rollout history
  (``card.history``: when it went live, how, and when it stopped serving).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

HISTORY_TAG = "card.history"
# MLflow keeps at most 5000 characters of a tag value or a description.
MAX_TEXT = 5000
METRICS = (("rmse", "RMSE", "lower"), ("mae", "MAE", "lower"), ("r2", "R²", "higher"))


def _f(value: Any) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return "-"


def _delta(new: Any, old: Any) -> str:
    try:
        new, old = float(new), float(old)
    except (TypeError, ValueError):
        return "-"
    pct = f" ({(new - old) / abs(old):+.1%})" if old else ""
    return f"{new - old:+.4g}{pct}"


def metrics_table(
    candidate: Mapping[str, Any], champion: Mapping[str, Any] | None, version: str, vs: str | None
) -> list[str]:
    """The candidate's holdout metrics next to the champion's on the same rows, and the deltas."""
    head = f"| metric | v{version} |" + (f" champion {vs} | Δ |" if champion else "")
    rows = [head, "|---|---|" + ("---|---|" if champion else "")]
    for key, name, better in METRICS:
        row = f"| {name} ({better} is better) | {_f(candidate.get(key))} |"
        if champion:
            row += f" {_f(champion.get(key))} | {_delta(candidate.get(key), champion.get(key))} |"
        rows.append(row)
    return rows


def evidence(
    *,
    name: str,
    version: str,
    evaluation: Mapping[str, Any],
    decision: Mapping[str, Any],
    bars: Mapping[str, Any],
    drift: Mapping[str, Any] | None,
    links: Mapping[str, str],
) -> str:
    """The approval form's body. ``evaluation`` as ``ml.pipeline.evaluate`` returns it,
    ``decision`` as ``ml.gate.Decision.to_dict``, ``bars`` the gate settings, ``drift`` the
    newest drift check (``scores``, ``thresholds``, ``when``) or None, ``links`` MLflow URLs
    (``model_version``, ``run``, ``plots``: list of ``(title, url)``)."""
    champion = evaluation.get("champion_version")
    lines = [
        f"**{name} v{version}** passed the gate: {decision.get('summary', '')}.",
        "",
        f"Holdout of the current window, {evaluation.get('holdout_rows', '?')} rows, "
        "every model scored on the same rows:",
        "",
        *metrics_table(
            evaluation["candidate"], evaluation.get("champion"), version, f"v{champion}"
        ),
        "",
        f"**Bars**: RMSE ≤ {bars['max_rmse']}, R² ≥ {bars['min_r2']}, RMSE at most "
        f"{float(bars['max_regression']):.1%} above @champion's.",
        "",
        *(
            f"- {'passed' if c['passed'] else 'FAILED'}: {c['name']}: {c['detail']}"
            for c in decision.get("checks", [])
        ),
        "",
    ]
    if drift and drift.get("scores"):
        top = sorted(drift["scores"].items(), key=lambda kv: -(kv[1] or 0))[:8]
        lines += [
            f"**Drift** (newest monitor_drift check, {drift.get('when', '?')}, PSI against "
            "@champion's training data):",
            "",
            "| column | PSI | threshold |",
            "|---|---|---|",
            *(_drift_row(c, v, drift["thresholds"].get(c)) for c, v in top),
            "",
        ]
    else:
        lines += ["**Drift**: no drift check has run against @champion yet.", ""]
    link_text = [f"[{title}]({url})" for title, url in links.get("plots", [])]
    for key, title in (("model_version", f"version v{version}"), ("run", "training run")):
        if links.get(key):
            link_text.append(f"[{title}]({links[key]})")
    if link_text:
        lines.append("**In MLflow**: " + " · ".join(link_text))
    for title, url in links.get("plots", []):
        lines += ["", f"![{title}]({url})"]
    return "\n".join(lines)


def _drift_row(column: str, psi: Any, threshold: Any) -> str:
    above = psi is not None and threshold is not None and float(psi) > float(threshold)
    shown = f"**{_f(psi)}** (above)" if above else _f(psi)
    return f"| `{column}` | {shown} | {_f(threshold)} |"


def history(tags: Mapping[str, str]) -> list[list[str]]:
    """The rollout history recorded on a version: ``[[when, what, how], ...]``, oldest first."""
    try:
        events = json.loads(tags.get(HISTORY_TAG) or "[]")
    except ValueError:
        return []
    return [list(map(str, e))[:3] for e in events if isinstance(e, list) and len(e) >= 3]


def with_event(tags: Mapping[str, str], when: str, what: str, how: str) -> str:
    """``card.history`` with one more event, the oldest dropped to stay within a tag's size."""
    events = [*history(tags), [when, what, how[:300]]]
    while len(text := json.dumps(events, ensure_ascii=False)) > MAX_TEXT - 500 and events[1:]:
        events = events[1:]
    return text


def model_card(name: str, version: str, tags: Mapping[str, str], run_id: str | None = None) -> str:
    """The version's description: what it was trained on, how it was judged, who approved it,
    and where it has been live (from its tags; at most :data:`MAX_TEXT` characters)."""
    t = tags
    by = (
        f"`{t['airflow_dag_id']}` run `{t['airflow_run_id']}`"
        if t.get("airflow_run_id")
        else "outside the Airflow pipeline"
    )
    head = [
        f"### {name} v{version}",
        "*Model card, written by the pipeline from the version's tags (edits are overwritten).*",
        "",
        "| | |",
        "|---|---|",
        f"| registered by | {by} |",
        f"| training run | `{run_id or '-'}` |",
        f"| data window | {t.get('data_window_start', '-')} .. {t.get('data_window_end', '-')} "
        "(end exclusive) |",
        f"| data digest | `{t.get('data_digest', '-')[:16]}` |",
        f"| code version | `{t.get('code_version', '-')}` |",
        "",
        "**Gate**: "
        + (
            {"true": "passed", "false": "rejected"}.get(t.get("gate.passed", ""), "not gated yet")
            + (f": {t['gate.summary']}" if t.get("gate.summary") else "")
        ),
    ]
    if t.get("holdout_rmse"):
        candidate = {k: t.get(f"holdout_{k}") for k, _, _ in METRICS}
        champion = {k: t.get(f"champion_holdout_{k}") for k, _, _ in METRICS}
        vs = t.get("champion_version_at_eval", "none")
        head += ["", *metrics_table(candidate, champion if vs != "none" else None, version,
                                    f"v{vs}")]  # fmt: skip
    if t.get("force"):
        head += ["", f"**Forced** (`force` tag): {t['force']}"]
    head += ["", f"**Approval**: {_approval(t)}", "", "**Rollout history**", ""]
    rows = [f"| {when} | {what} | {how} |" for when, what, how in history(t)]
    table = ["| when (UTC) | what | how |", "|---|---|---|"]
    while rows and len("\n".join(head + table + rows)) > MAX_TEXT:
        rows = rows[1:]
    return "\n".join(head + (table + rows if rows else ["not rolled out yet"]))


def _approval(t: Mapping[str, str]) -> str:
    if t.get("approval.pending"):
        return "waiting for a decision (Airflow: Browse → Required Actions)"
    if not t.get("approval.at"):
        return "not asked (`require_approval` was off)" if t.get("gate.passed") else "-"
    reason = f": {t['approval.reason']}" if t.get("approval.reason") else ""
    return (
        f"{t.get('approval', '?')} by {t.get('approval.by', '?')} via "
        f"{t.get('approval.via', '?')} at {t['approval.at']}{reason}"
    )
