"""The deployment gate: may this model replace what is live? (pure: no I/O)

A candidate must clear absolute bars (RMSE, R² on the holdout) and, once a champion exists,
must not be worse than the champion on the *same* holdout by more than the allowed relative
regression. ``force_deploy`` lets a person override a rejection, but the failed checks stay on
the record so the override is visible in the registry and in the run logs.

The :class:`Decision` travels through Airflow XCom (``to_dict``/``from_dict``) and is written
onto the model version as tags (``to_tags``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ml.settings import GateSettings

REQUIRED_METRICS = ("rmse", "mae", "r2")

# The version tags that clear a version to become @champion: a passed gate, or a person's reason
# for deploying it anyway (set by hand on the version, in the MLflow UI or with the client).
PASSED_TAG = "gate.passed"
FORCE_TAG = "force"

NO_CHAMPION_DETAIL = "no champion yet: only absolute bars apply"


@dataclass(frozen=True)
class Check:
    """One rule of the gate and how the candidate fared against it."""

    name: str
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Check:
        return cls(name=str(data["name"]), passed=bool(data["passed"]), detail=str(data["detail"]))


@dataclass(frozen=True)
class Decision:
    """The gate's verdict.

    ``passed`` is what the pipeline acts on. ``forced`` is True only when ``force_deploy``
    actually overrode failed checks (a forced run whose checks all pass is a plain approval).
    """

    passed: bool
    forced: bool
    checks: tuple[Check, ...]
    has_champion: bool

    @property
    def reasons(self) -> list[str]:
        """Details of the failed checks (kept even when forced)."""
        return [c.detail for c in self.checks if not c.passed]

    def summary(self) -> str:
        if self.forced:
            return "forced past: " + "; ".join(self.reasons) + " (force_deploy)"
        if self.passed:
            names = ", ".join(c.name for c in self.checks)
            return f"approved: all {len(self.checks)} checks passed ({names})"
        return "rejected: " + "; ".join(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; ``reasons`` and ``summary`` are included for readers, ignored on load."""
        return {
            "passed": self.passed,
            "forced": self.forced,
            "has_champion": self.has_champion,
            "checks": [c.to_dict() for c in self.checks],
            "reasons": self.reasons,
            "summary": self.summary(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        checks = tuple(Check.from_dict(c) for c in data["checks"])
        return cls(bool(data["passed"]), bool(data["forced"]), checks, bool(data["has_champion"]))

    def to_tags(self) -> dict[str, str]:
        """Model-version tags; MLflow tag values are strings, so booleans become 'true'/'false'."""
        tags = {
            PASSED_TAG: _bool(self.passed),
            "gate.forced": _bool(self.forced),
            "gate.has_champion": _bool(self.has_champion),
            "gate.summary": self.summary(),
            "gate.reasons": "; ".join(self.reasons) or "none",
            "gate.checks": json.dumps([c.to_dict() for c in self.checks], separators=(",", ":")),
        }
        # One tag per check too: readable at a glance in the MLflow UI, filterable in searches.
        for c in self.checks:
            tags[f"gate.check.{c.name}"] = ("passed: " if c.passed else "failed: ") + c.detail
        return tags


def uncleared(tags: Mapping[str, str]) -> str | None:
    """Why the version with ``tags`` may not become ``@champion``, or None when it may.

    The one rule of production: a version goes live only with a passed gate
    (``gate.passed=true``) or with a reason a person wrote in its ``force`` tag. The rollout
    refuses any other (``serving.deploy.rollout.plan``); reconcile and the exporter report a
    ``@champion`` that breaks it.
    """
    if tags.get(PASSED_TAG) == "true" or str(tags.get(FORCE_TAG) or "").strip():
        return None
    if PASSED_TAG in tags:
        return f"its gate rejected it ({str(tags.get('gate.reasons', '?'))[:300]})"
    return "it was never gated (no gate.passed tag)"


def decide(
    candidate: Mapping[str, float], champion: Mapping[str, float] | None, settings: GateSettings
) -> Decision:
    """Judge ``candidate`` holdout metrics against the bars and the champion's metrics.

    Both mappings need ``rmse``, ``mae`` and ``r2`` computed on the same holdout rows.
    Raises ``ValueError`` when a metric is missing or not a number.
    """
    cand = _metrics(candidate, "candidate")
    champ = _metrics(champion, "champion") if champion is not None else None

    checks = (
        _bar("max_rmse", "RMSE", cand["rmse"], settings.max_rmse, at_most=True),
        _bar("min_r2", "R²", cand["r2"], settings.min_r2, at_most=False),
        _no_regression(cand["rmse"], champ, settings.max_regression),
    )
    all_passed = all(c.passed for c in checks)
    forced = settings.force_deploy and not all_passed
    return Decision(all_passed or settings.force_deploy, forced, checks, champ is not None)


def _metrics(values: Mapping[str, Any], which: str) -> dict[str, float]:
    missing = [k for k in REQUIRED_METRICS if k not in values]
    if missing:
        raise ValueError(
            f"{which} metrics lack {', '.join(missing)} (got {sorted(values)}); "
            f"the gate needs {', '.join(REQUIRED_METRICS)}"
        )
    out: dict[str, float] = {}
    for key in REQUIRED_METRICS:
        value = values[key]
        # bool is an int subclass; a True RMSE is a bug upstream, not a number.
        if isinstance(value, bool):
            raise ValueError(f"{which} metric {key} is a bool ({value!r}), not a number")
        try:
            out[key] = float(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{which} metric {key}={value!r} is not a number") from exc
    return out


def _bar(name: str, what: str, value: float, bar: float, *, at_most: bool) -> Check:
    # Comparisons with NaN are False, but spell the non-finite case out so the reason is clear.
    if not math.isfinite(value):
        return Check(name, False, f"holdout {what} is {value} (not finite); bar {_f(bar)}")
    ok = value <= bar if at_most else value >= bar
    sign = ("<=" if ok else ">") if at_most else (">=" if ok else "<")
    return Check(name, ok, f"holdout {what} {_f(value)} {sign} bar {_f(bar)}")


def _no_regression(rmse: float, champion: Mapping[str, float] | None, allowed: float) -> Check:
    name = "no_regression"
    if champion is None:
        return Check(name, True, NO_CHAMPION_DETAIL)
    champ = champion["rmse"]
    if not math.isfinite(rmse) or not math.isfinite(champ):
        # A non-finite value makes the comparison meaningless; never let it pass.
        # (A broken champion can be replaced with force_deploy.)
        why = f"cannot compare: holdout RMSE {rmse} vs champion RMSE {champ} (not finite)"
        return Check(name, False, why)
    limit = champ * (1.0 + allowed)
    bound = f"{_f(limit)} (champion {_f(champ)} + {allowed:.1%})"
    if rmse <= limit:
        return Check(name, True, f"holdout RMSE {_f(rmse)} <= {bound}")
    worse = (rmse / champ - 1.0) if champ > 0 else math.inf
    return Check(
        name, False, f"holdout RMSE {_f(rmse)} > {bound}: {worse:.1%} worse than the champion"
    )


def _f(x: float) -> str:
    return f"{x:.4g}"


def _bool(x: bool) -> str:
    return "true" if x else "false"
