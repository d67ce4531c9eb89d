"""The rollout pod's operator: KubernetesPodOperator, with its exit code read as a verdict.

Imported only where a pod is started (``_support.pod_task``): the kubernetes clients are most
of the provider's import time.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk.exceptions import AirflowFailException

from serving.deploy.pods import ROLLOUT_FINAL_EXIT_CODES

__all__ = ["KubernetesPodOperator", "RolloutPodOperator"]


class RolloutPodOperator(KubernetesPodOperator):
    """A failed rollout pod whose container exited with a final code (1: a verdict on the
    version, 2: a refusal) fails the task without retries: a retry would only say the same.
    Every other failure (3: a fault, an evicted or OOM-killed pod, a pod that never started)
    stays an ordinary failure, retried."""

    def cleanup(self, pod: Any, remote_pod: Any, *args: Any, **kwargs: Any) -> None:
        try:
            super().cleanup(pod, remote_pod, *args, **kwargs)
        except AirflowFailException:
            raise
        except Exception as exc:
            code = exit_code(remote_pod, self.base_container_name)
            if code in ROLLOUT_FINAL_EXIT_CODES:
                raise AirflowFailException(
                    f"the rollout pod exited {code} ({ROLLOUT_FINAL_EXIT_CODES[code]}): not "
                    f"retried; its log above says why. {exc}"
                ) from exc
            raise


def exit_code(pod: Any, container: str) -> int | None:
    """The exit code of ``container`` in a finished pod (None while it runs or is unknown)."""
    statuses = (pod.status.container_statuses if pod and pod.status else None) or []
    for status in statuses:
        if status.name == container and status.state and status.state.terminated:
            return status.state.terminated.exit_code
    return None
