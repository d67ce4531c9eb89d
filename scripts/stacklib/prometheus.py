"""The stack's Prometheus: its generated configuration and rule file, command line and web pages."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

# The rules' one source: the PrometheusRules of the monitoring kustomize base (the model
# server's, and one per concern beside it: quality, governance, the rollout judge's recording
# rules). This Prometheus has no operator to load them: rules_yaml() is their groups as a plain
# rule file.
MONITORING = Path(__file__).resolve().parents[2] / "docker" / "k8s" / "monitoring"
PROMETHEUS_RULE = MONITORING / "prometheus-rule.yaml"
# The rollout judge's measures (serving/deploy/judge.py), over the slots' tracked series.
JUDGE_RULE = MONITORING / "rollout-judge-rule.yaml"


def rule_sources() -> list[Path]:
    return sorted(MONITORING.glob("*rule.yaml"))


MODEL_SERVER_JOB = "model-server"  # the job the alert rules select (docs/operations.md, Alerts)
# The local target's slots, each with its track (stable, canary): what the judge compares.
TRACKS_JOB = "model-server-tracks"
REGISTRY_JOB = "registry"
# Where the Airflow plugin's exporter answers (plugins/registry_events: URL_PREFIX + /metrics).
REGISTRY_METRICS_PATH = "/registry-events/metrics"
# Each web page, where Prometheus versions serve it: Debian's 2.42 only under /classic/
# (its /targets and /alerts answer 404), upstream 2.x both, 3.x only the new ones.
PAGES = {
    "graph": ("/graph", "/classic/graph"),
    "targets": ("/targets", "/classic/targets"),
    "alerts": ("/alerts", "/classic/alerts"),
}


def rules_yaml(*sources: Path) -> str:
    """A plain Prometheus rule file of the groups of the PrometheusRules ``sources`` (default:
    :func:`rule_sources`), as the operator hands them to its Prometheus, with a header saying
    where they come from."""
    sources = sources or tuple(rule_sources())
    groups = []
    for source in sources:
        try:
            rule = yaml.safe_load(source.read_text())
            found = rule["spec"]["groups"] if rule["kind"] == "PrometheusRule" else None
        except (yaml.YAMLError, KeyError, TypeError) as exc:
            raise ValueError(f"{source} is not a PrometheusRule: {exc}") from None
        if not isinstance(found, list):
            raise ValueError(f"{source} is not a PrometheusRule with spec.groups")
        groups += found
    names = ", ".join(str(s) for s in sources)
    header = f"# Derived from {names} at every `make run`: edit those files.\n"
    return header + yaml.safe_dump({"groups": groups}, sort_keys=False)


def prometheus_config(
    model_server: str,
    registry: str,
    rule_files,
    *,
    scrape_interval_s: int = 10,
    tracks_file: Path | None = None,
) -> dict[str, Any]:
    """The local Prometheus' configuration (pure).

    ``model_server`` is ``host:port`` of the local target's front port, and only that: each
    blue/green slot is down between rollouts and, scraped as job ``model-server``, would fire
    ModelServerDown. ``registry`` is ``host:port`` of the Airflow API server, whose
    registry_events plugin exports the alias and drift gauges. ``rule_files`` (:func:`rules_yaml`
    written out: the alerts, and the rollout judge's recording rules) must be absolute (a
    relative one would be read relative to the config file's folder, under the state dir).
    ``tracks_file``: the local target's slots as file_sd targets labelled with their track
    (``serving.deploy.local``, ``prometheus-targets.json``), scraped as job
    :data:`TRACKS_JOB` for the rollout judge; a slot is a target only while it serves.
    """
    if scrape_interval_s < 1:
        raise ValueError(f"scrape interval of {scrape_interval_s}s: at least 1s")
    if relative := [str(path) for path in rule_files if not Path(path).is_absolute()]:
        raise ValueError(f"rule files must be absolute paths: {relative}")
    job = {"job_name": MODEL_SERVER_JOB, "metrics_path": "/metrics"}
    targets = lambda target: {"static_configs": [{"targets": [target]}]}  # noqa: E731
    scrape_configs = [
        job | targets(model_server),
        {"job_name": REGISTRY_JOB, "metrics_path": REGISTRY_METRICS_PATH} | targets(registry),
    ]
    if tracks_file is not None:
        sd = {"files": [str(tracks_file)], "refresh_interval": "5s"}
        scrape_configs.append(
            {"job_name": TRACKS_JOB, "metrics_path": "/metrics", "file_sd_configs": [sd]}
        )
    return {
        "global": {
            "scrape_interval": f"{scrape_interval_s}s",
            # At most the interval (Prometheus refuses a longer one), at most 10 s.
            "scrape_timeout": f"{min(scrape_interval_s, 10)}s",
            "evaluation_interval": f"{scrape_interval_s}s",
        },
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": scrape_configs,
    }


def prometheus_yaml(config: dict[str, Any]) -> str:
    """``config`` as prometheus.yml, with a header saying where it comes from."""
    header = (
        "# Generated by scripts/stack.py (prometheus_config) at every `make run`: edits are lost.\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False)


def prometheus_argv(
    binary: str, config: Path, data: Path, port: int, host: str = "127.0.0.1", retention="2d"
) -> list[str]:
    """Loopback only, its own data folder, short retention; ``--web.enable-lifecycle`` lets
    ``curl -X POST .../-/reload`` reread the config and the rule file."""
    return [
        binary, f"--config.file={config}", f"--storage.tsdb.path={data}",
        f"--storage.tsdb.retention.time={retention}", f"--web.listen-address={host}:{port}",
        "--web.enable-lifecycle",
    ]  # fmt: skip


def prometheus_binary() -> str | None:
    """$PROMETHEUS_BIN, else `prometheus` on PATH (Debian's package: /usr/bin/prometheus)."""
    configured = os.environ.get("PROMETHEUS_BIN")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    return shutil.which("prometheus")


def choose_pages(status: Mapping[str, int]) -> dict[str, str]:
    """``{page: path}`` of each page in PAGES: the first of its paths that answered 200 in
    ``status`` (``{path: HTTP status}``); a page that answered nowhere is left out."""
    chosen = {
        page: next((p for p in paths if status.get(p) == 200), None)
        for page, paths in PAGES.items()
    }
    return {page: path for page, path in chosen.items() if path}


def prometheus_pages(url: str) -> dict[str, str]:
    """``{page: URL}`` of the pages the running Prometheus at ``url`` serves (asked, not
    assumed from a version)."""
    status = {}
    with httpx.Client(base_url=url, timeout=3) as client:
        for path in (p for paths in PAGES.values() for p in paths):
            try:
                status[path] = client.get(path).status_code
            except httpx.HTTPError:
                status[path] = 0
    return {page: url + path for page, path in choose_pages(status).items()}


def prometheus_targets(url: str) -> list[str]:
    """One line per active scrape target: job, URL, health, last error ([] without an answer)."""
    try:
        response = httpx.get(f"{url}/api/v1/targets", params={"state": "active"}, timeout=3)
        targets = response.json()["data"]["activeTargets"]
        return [
            f"{t['labels'].get('job', ''):<13} {t['scrapeUrl']}: {t['health']}"
            + (f" ({t['lastError']})" if t.get("lastError") else "")
            for t in targets
        ]
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return []
