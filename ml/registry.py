"""The MLflow model registry as this pipeline uses it: versions, tags and aliases.

``@champion`` names what is live, ``@challenger`` what passed the gate and is rolling out.
Stages are deprecated in MLflow 3 and are not used. Everything handed out is pinned to a
version number (``models:/<name>/<version>``), never to an alias, so a deploy cannot change
under our feet when someone moves an alias.

Failure modes are made explicit at this edge:
- the tracking server is unreachable -> :class:`RegistryUnavailableError`, quickly;
- a version/alias/model does not exist -> :class:`LookupError` (or ``None`` where absence is
  normal, e.g. no champion before the first deploy).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from ml.settings import RegistrySettings

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

# MLflow's HTTP client defaults to 7 retries with exponential backoff and a 120 s timeout per
# request, so a dead server looks like a multi-minute hang. These defaults bound it to seconds;
# they are only applied when the user has not set the variables themselves.
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
HEALTH_TIMEOUT_S = (3.0, 5.0)  # (connect, read) for GET /health
# How long a new version may stay PENDING_REGISTRATION (a remote registry copying artifacts)
# before registering it fails; MLflow polls every 3 s.
READY_TIMEOUT_S = 300


def use_mlflow(tracking_uri: str) -> None:
    """Point MLflow's process-wide tracking *and* registry URIs at ``tracking_uri``.

    ``models:/`` URIs are resolved against the global registry URI (an explicit
    ``registry_uri=`` argument does not reach every code path, e.g. ``download_artifacts``),
    and a stray ``MLFLOW_REGISTRY_URI`` would otherwise win over the tracking URI.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)


class RegistryUnavailableError(RuntimeError):
    """The tracking/registry server cannot be reached (down, refusing, timing out)."""


@dataclass(frozen=True)
class VersionInfo:
    """A registered model version, as plain data (JSON-able via ``to_dict`` for XCom)."""

    name: str
    version: str
    run_id: str | None
    source: str
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    @property
    def model_uri(self) -> str:
        # Always the number: an alias can move between resolving it and loading it.
        return f"models:/{self.name}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["aliases"] = list(self.aliases)
        data["model_uri"] = self.model_uri
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VersionInfo:
        return cls(
            name=str(data["name"]),
            version=str(data["version"]),
            run_id=data.get("run_id") or None,
            source=str(data.get("source", "")),
            tags=dict(data.get("tags") or {}),
            aliases=tuple(data.get("aliases") or ()),
        )

    @classmethod
    def from_mlflow(cls, mv: ModelVersion) -> VersionInfo:
        return cls(
            name=mv.name,
            version=str(mv.version),
            run_id=mv.run_id or None,
            source=mv.source or "",
            tags=dict(mv.tags or {}),
            aliases=tuple(mv.aliases or ()),
        )


class Registry:
    """One registered model (``settings.model_name``) on one tracking server."""

    def __init__(self, tracking_uri: str, settings: RegistrySettings) -> None:
        self.tracking_uri = tracking_uri
        self.settings = settings
        self.name = settings.model_name
        self._is_http = tracking_uri.lower().startswith(("http://", "https://"))
        self._checked = False
        if self._is_http:
            for key, value in HTTP_ENV_DEFAULTS.items():
                os.environ.setdefault(key, value)

    def __repr__(self) -> str:
        return f"Registry({self.tracking_uri!r}, model={self.name!r})"

    # -- edges -------------------------------------------------------------------------------

    @cached_property
    def client(self) -> MlflowClient:
        # Lazy: for SQL URIs constructing the client already opens the database.
        from mlflow import MlflowClient

        with self._edge("open the MLflow client"):
            return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def check_available(self) -> None:
        """Raise :class:`RegistryUnavailableError` within seconds if the server is not there."""
        if self._is_http:
            self._check_http()
        else:
            with self._edge("list registered models"):
                self.client.search_registered_models(max_results=1)
        self._checked = True

    def _check_http(self) -> None:
        base = self.tracking_uri.rstrip("/")
        status = self._probe(base + "/health")
        if status == 404:
            # A reverse proxy may not route /health: ask the REST API itself.
            status = self._probe(base + "/api/2.0/mlflow/registered-models/search?max_results=1")
        # 401/403: something MLflow-shaped is answering; credentials are the client's business.
        if status in (200, 401, 403):
            return
        raise RegistryUnavailableError(
            f"MLflow tracking server at {self.tracking_uri} is not serving: HTTP {status} "
            "(is the tracking URI right, and is the server started?)"
        )

    def _probe(self, url: str) -> int:
        import requests

        try:
            # One plain request, no retries: this is the fast path.
            return requests.get(url, timeout=HEALTH_TIMEOUT_S).status_code
        except requests.RequestException as exc:
            raise RegistryUnavailableError(
                f"MLflow tracking server at {self.tracking_uri} is unreachable: "
                f"GET {url} failed ({type(exc).__name__}: {_first_line(exc)})"
            ) from exc

    @contextmanager
    def _edge(self, what: str) -> Iterator[None]:
        """Turn connection-level failures into RegistryUnavailableError; pass the rest on."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except RegistryUnavailableError:
            raise
        except _connection_errors() as exc:
            raise self._unavailable(what, exc) from exc
        except MlflowException as exc:
            if _is_connection_failure(exc):
                raise self._unavailable(what, exc) from exc
            raise
        except Exception as exc:
            # SQL stores raise driver errors (e.g. sqlite "unable to open database file").
            if _is_sql_connection_error(exc):
                raise self._unavailable(what, exc) from exc
            raise

    def _unavailable(self, what: str, exc: BaseException) -> RegistryUnavailableError:
        return RegistryUnavailableError(
            f"MLflow registry at {self.tracking_uri} is unavailable: could not {what} "
            f"({type(exc).__name__}: {_first_line(exc)})"
        )

    @contextmanager
    def _call(self, what: str) -> Iterator[MlflowClient]:
        # Probe once per instance so a dead server fails in seconds, not after MLflow's retries.
        if not self._checked:
            self.check_available()
        with self._edge(what):
            yield self.client

    # -- reads -------------------------------------------------------------------------------

    def get(self, version_or_alias: str | int) -> VersionInfo:
        """Resolve ``3``, ``"3"``, ``"@champion"`` or ``"champion"`` to a version."""
        ref = str(version_or_alias).strip()
        if ref.isdigit():
            return self._version(ref)
        alias = ref.removeprefix("@")
        if not alias:
            raise LookupError(f"Empty version or alias {version_or_alias!r} for {self.name!r}")
        if alias.lower() == "latest":  # MLflow's reserved pseudo-alias
            latest = self.latest_version()
            if latest is None:
                raise LookupError(f"Registered model {self.name!r} has no versions yet")
            return latest
        aliases = self._aliases()
        if aliases is None:
            raise LookupError(
                f"Registered model {self.name!r} does not exist at {self.tracking_uri}"
            )
        if alias not in aliases:
            known = ", ".join(f"@{a}->v{v}" for a, v in sorted(aliases.items())) or "none"
            raise LookupError(
                f"Registered model {self.name!r} has no alias @{alias} (aliases: {known})"
            )
        return self._version(aliases[alias])

    def champion(self) -> VersionInfo | None:
        """The version that is live (``@champion``), or None before the first deploy."""
        aliases = self._aliases()
        if not aliases or self.settings.champion_alias not in aliases:
            return None
        return self._version(aliases[self.settings.champion_alias])

    def latest_version(self) -> VersionInfo | None:
        found = self.newest_versions(1)
        return found[0] if found else None

    def newest_versions(self, count: int) -> list[VersionInfo]:
        """The ``count`` highest version numbers, newest first (whatever their gate said)."""
        with self._call("search model versions") as client:
            found = client.search_model_versions(
                filter_string=f"name = '{_quote(self.name)}'",
                max_results=count,
                order_by=["version_number DESC"],
            )
        return [VersionInfo.from_mlflow(mv) for mv in found]

    def _version(self, version: str) -> VersionInfo:
        with self._call(f"get version {version} of {self.name!r}") as client:
            try:
                mv = client.get_model_version(self.name, str(version))
            except Exception as exc:
                if _is_not_found(exc):
                    raise LookupError(
                        f"Registered model {self.name!r} has no version {version} "
                        f"at {self.tracking_uri}"
                    ) from exc
                raise
        return VersionInfo.from_mlflow(mv)

    def _aliases(self) -> dict[str, str] | None:
        """alias -> version of the registered model; None if the model does not exist."""
        with self._call(f"get registered model {self.name!r}") as client:
            try:
                model = client.get_registered_model(self.name)
            except Exception as exc:
                if _is_not_found(exc):
                    return None
                raise
        return {alias: str(v) for alias, v in (model.aliases or {}).items()}

    # -- writes ------------------------------------------------------------------------------

    def register(self, model_uri: str, run_id: str, tags: Mapping[str, str]) -> VersionInfo:
        """Create a new version from a logged model (``models:/<model id>`` or
        ``runs:/<run>/<path>``) with ``mlflow.register_model``, which links the version to its
        logged model and run, and wait until it is READY.

        A version whose registration fails, or that is still pending after
        ``READY_TIMEOUT_S``, raises MLflow's error naming the model, the version and its status.
        Its description is its model card (:mod:`ml.card`).
        """
        import mlflow

        from ml.card import model_card

        self._ensure_registered_model()
        # register_model talks to the process-wide registry URI.
        use_mlflow(self.tracking_uri)
        tags = {str(k): str(v) for k, v in tags.items()}
        with self._call(f"create a version of {self.name!r}") as client:
            mv = mlflow.register_model(
                model_uri, self.name, await_registration_for=READY_TIMEOUT_S, tags=tags
            )
            card = model_card(self.name, str(mv.version), tags, run_id)
            mv = client.update_model_version(self.name, mv.version, description=card)
        log.info("Registered %s v%s from %s", self.name, mv.version, mv.source)
        return VersionInfo.from_mlflow(mv)

    def _ensure_registered_model(self) -> None:
        """Create the registered model with its description (``register_model`` would create
        it without one)."""
        if self._aliases() is not None:
            return
        description = (
            "Keras regression model trained and deployed by the train_and_deploy pipeline. "
            f"@{self.settings.champion_alias} is what is live; "
            f"@{self.settings.challenger_alias} passed the gate and is being rolled out. "
            "Each version carries its data window, data digest, code version, run id and "
            "gate decision as tags."
        )
        with self._call(f"create registered model {self.name!r}") as client:
            try:
                client.create_registered_model(self.name, description=description)
            except Exception as exc:
                # Another run created it between our check and now: fine.
                if _error_code(exc) not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                    raise

    def tag_version(self, version: str, tags: Mapping[str, str]) -> None:
        version = str(version)
        with self._call(f"tag version {version} of {self.name!r}") as client:
            for key, value in tags.items():
                try:
                    client.set_model_version_tag(self.name, version, str(key), str(value))
                except Exception as exc:
                    if _is_not_found(exc):
                        raise LookupError(
                            f"Registered model {self.name!r} has no version {version}"
                        ) from exc
                    raise

    def update_card(self, version: str, event: tuple[str, str] | None = None) -> None:
        """Render the version's model card (:func:`ml.card.model_card`) from its tags into its
        description; with ``event`` (what, how) added to its rollout history first."""
        from datetime import UTC, datetime

        from ml import card

        info = self.get(version)
        tags = dict(info.tags)
        if event is not None:
            when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
            tags[card.HISTORY_TAG] = card.with_event(tags, when, *event)
            self.tag_version(info.version, {card.HISTORY_TAG: tags[card.HISTORY_TAG]})
        with self._call(f"write the model card of version {info.version}") as client:
            client.update_model_version(
                self.name,
                info.version,
                description=card.model_card(self.name, info.version, tags, info.run_id),
            )

    def log_report(self, version: str, report: Mapping[str, Any], artifact_file: str) -> str:
        """``report`` as JSON in the run of ``version`` (``artifact_file``, a path in its
        artifacts); its ``runs:/`` URI, or "" for a version without a run."""
        info = self._version(str(version))
        if not info.run_id:
            return ""
        with self._call(f"log {artifact_file} of version {version}") as client:
            client.log_dict(info.run_id, dict(report), artifact_file)
        return f"runs:/{info.run_id}/{artifact_file}"

    def set_alias(self, alias: str, version: str) -> None:
        alias, version = alias.removeprefix("@"), str(version)
        with self._call(f"set alias @{alias} on {self.name!r}") as client:
            try:
                client.set_registered_model_alias(self.name, alias, version)
            except Exception as exc:
                if _is_not_found(exc):
                    raise LookupError(
                        f"Cannot point @{alias} at {self.name!r} version {version}: no such version"
                    ) from exc
                raise

    def delete_alias(self, alias: str) -> None:
        """Remove an alias; absent alias or model is not an error (the goal state holds)."""
        alias = alias.removeprefix("@")
        aliases = self._aliases()
        if not aliases or alias not in aliases:
            return
        with self._call(f"delete alias @{alias} of {self.name!r}") as client:
            try:
                client.delete_registered_model_alias(self.name, alias)
            except Exception as exc:
                if not _is_not_found(exc):
                    raise


def _error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


def _is_not_found(exc: BaseException) -> bool:
    code = _error_code(exc)
    if code == "RESOURCE_DOES_NOT_EXIST":
        return True
    # Some stores report missing aliases/versions as invalid parameters.
    return code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc).lower()


def _connection_errors() -> tuple[type[BaseException], ...]:
    # Not HTTPError: a 404 is an answer, not an outage.
    import requests

    return (
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.RetryError,
        requests.exceptions.ChunkedEncodingError,
    )


def _is_connection_failure(exc: BaseException) -> bool:
    """MLflow's REST client wraps requests errors as ``API request to <url> failed ...``."""
    context = exc.__cause__ or exc.__context__
    if isinstance(context, _connection_errors()):
        return True
    message = str(getattr(exc, "message", exc))
    return message.startswith("API request to ") and "failed with" in message


def _is_sql_connection_error(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__ if cls.__module__.startswith("sqlalchemy")}
    return bool(names & {"OperationalError", "InterfaceError", "TimeoutError"})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def _quote(value: str) -> str:
    return value.replace("'", "\\'")
