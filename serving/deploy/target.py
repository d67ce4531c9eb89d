"""The contract between the rollout path and where models are served.

:mod:`serving.deploy.rollout` decides; a :class:`Target` (``local``: model-server processes
behind a front port; ``kubernetes``: the serving Deployment) does. Both sides import this
module and nothing of each other.

Every failure is one of two kinds, and the difference decides what Airflow does with it:

* a **verdict** on the version (:class:`Verdict`): a check ran and the version failed it. Its
  endpoint answered wrongly (:class:`VerificationFailed`) or its pods never passed their
  readiness probe (:class:`NotReady`). The version is tagged ``rollout.failed``, what served
  before is put back, and the task fails without retries: retrying cannot change the answer.
* a **fault** (:class:`RolloutError`): the rollout could not be completed and learned nothing
  about the version (the API server or the registry did not answer, a watch was lost, pods
  could not be scheduled). Nothing is tagged, nothing moves, the task is retried.

Two more are final without being verdicts: :class:`RequestRejected` (the request names a
version the registry does not have) and :class:`TargetRejected` (the target refuses what it
was asked to do: a cluster too old for a field of the Deployment, a missing Deployment).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol


class Verdict(RuntimeError):
    """A check on the version ran and the version failed it."""


class VerificationFailed(Verdict):
    """The endpoint answered, and not what the version answers."""


class NotReady(Verdict):
    """The version's pods never passed their readiness probe within the progress deadline.

    ``restored`` names the version the target put back (None: nothing served before it, and
    the endpoint serves nothing now)."""

    def __init__(self, message: str, *, restored: str | None) -> None:
        super().__init__(message)
        self.restored = restored


class RolloutError(RuntimeError):
    """The rollout could not be completed, and it says nothing about the version: retry."""


class DeployFailed(RolloutError):
    """The target could not put the version live; what served before still serves."""


class EndpointUnreachable(RolloutError):
    """The endpoint did not answer (refused, reset, timed out): not a verdict on any version."""


class RequestRejected(ValueError):
    """The request names a version the registry does not have: retrying will not help."""


class TargetRejected(RuntimeError):
    """The target refuses the request for a reason retrying cannot fix (a person must act)."""


@dataclass(frozen=True)
class Live:
    """What a target serves: the version, whether it is healthy, and in words why not."""

    version: str | None
    healthy: bool
    detail: str = ""


class Target(Protocol):
    """Where models are served: the local target or the Kubernetes Deployment."""

    name: str

    @property
    def endpoint(self) -> str:
        """Base URL the rollout verifies through."""

    def lock(self, holder: str) -> AbstractContextManager[None]:
        """Held for a whole rollout: one rollout at a time on this target."""

    def live(self) -> Live:
        """The version served now, and whether it is healthy."""

    def deploy(self, model_uri: str, version: str) -> dict[str, Any]:
        """Put the pinned version live and return what happened.

        Raises :class:`NotReady` (a verdict; the target already put back what served before)
        or :class:`DeployFailed` (a fault; what served before still serves)."""

    def withdraw(self) -> None:
        """Stop serving: after a failed rollout with nothing good to go back to."""

    # A candidate beside the live version (shadow and canary: serving.deploy.progressive).
    # mirrors: whether a shadow step can send it mirrored requests.
    mirrors: bool

    @property
    def candidate_endpoint(self) -> str:
        """Base URL of the candidate alone (verified there before it gets any traffic)."""

    def start_candidate(self, model_uri: str, version: str, *, live_uri: str) -> dict[str, Any]:
        """Start the version beside the live one, with no traffic, its prediction histogram
        in the buckets of ``live_uri``. Raises like :meth:`deploy`."""

    def route(self, weight: float, mirror: float) -> None:
        """The candidate answers ``weight`` of the predictions and gets ``mirror`` of the
        others mirrored (0 to 1 each)."""

    def candidate_healthy(self) -> bool:
        """The candidate still answers."""

    def promote_candidate(self) -> dict[str, Any]:
        """The candidate becomes the live version and takes every request."""

    def drop_candidate(self) -> None:
        """Every request back on the live version within seconds, then the candidate goes."""
