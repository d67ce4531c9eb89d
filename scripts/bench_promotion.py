"""How long a promotion in the MLflow registry takes to go live on the local stack.

    make run                      # a running stack with at least one version
    python scripts/bench_promotion.py [--rounds 3]

Moves ``@champion`` back and forth between two versions (registering a second version of the
champion's model if the registry has only one), exactly as a person does in the MLflow UI,
and times each move until the front port answers with the new ``X-Model-Version``: MLflow's
webhook, the plugin's asset event, the scheduler starting ``deploy_model``, its tasks, the
model server's start and the switch. Prints one line per round and the median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import httpx

MLFLOW = os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
ENDPOINT = f"http://127.0.0.1:{os.environ.get('PIPELINE_DEPLOY_LOCAL_PORT', '5001')}"


def served() -> str | None:
    try:
        return httpx.get(f"{ENDPOINT}/v1/model", timeout=5).json().get("version")
    except (httpx.HTTPError, ValueError):
        return None


def main() -> int:
    from mlflow import MlflowClient

    from ml.settings import RegistrySettings

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()

    registry = RegistrySettings()
    client = MlflowClient(MLFLOW, MLFLOW)
    champion = client.get_model_version_by_alias(registry.model_name, registry.champion_alias)
    others = [
        v
        for v in client.search_model_versions(f"name = '{registry.model_name}'")
        if str(v.version) != str(champion.version)
        and "rollout.failed" not in (v.tags or {})
        and (v.tags or {}).get("gate.passed") == "true"
    ]
    if others:
        other = max(others, key=lambda v: int(v.version))
    else:
        # A version goes live only with a passed gate or a person's `force` reason.
        reason = f"bench_promotion: a copy of v{champion.version}"
        other = client.create_model_version(
            registry.model_name, champion.source, run_id=champion.run_id, tags={"force": reason}
        )
        print(f"registered v{other.version}: a copy of v{champion.version} to promote")
    pair = [str(champion.version), str(other.version)]
    if served() != pair[0]:
        print(f"the endpoint serves {served()}, @champion is v{pair[0]}: not a settled stack")
        return 1
    times = []
    for round_ in range(args.rounds):
        target = pair[(round_ + 1) % 2]
        started = time.monotonic()
        client.set_registered_model_alias(registry.model_name, registry.champion_alias, target)
        while served() != target:
            if time.monotonic() - started > args.timeout:
                print(f"round {round_ + 1}: v{target} not live after {args.timeout:.0f}s")
                return 1
            time.sleep(0.25)
        seconds = time.monotonic() - started
        times.append(seconds)
        print(f"round {round_ + 1}: @champion -> v{target}: live after {seconds:.1f}s", flush=True)
        time.sleep(20)  # let deploy_model finish (its verification) before the next move
    print(f"median over {len(times)} promotions: {statistics.median(times):.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
