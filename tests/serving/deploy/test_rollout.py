"""The rollout path's decision (``plan``, pure) as a table, and the request it reads."""

from __future__ import annotations

import pytest

from serving.deploy.rollout import FAILED_BY_TAG, FAILED_TAG, Live, Plan, Request, plan

HEALTHY_1 = Live("1", True)
HEALTHY_2 = Live("2", True)
DOWN_2 = Live("2", False, "the model server on port 5011 is down")
NOTHING = Live(None, False, "nothing deployed")
FAILED_EARLIER = {FAILED_TAG: "first at row 0: endpoint 1.0, expected 2.0", FAILED_BY_TAG: "run-a"}

CASES = [
    # (name, request, champion, live, failed tags of the target, expected action, version, promote)
    (
        "nightly candidate, champion unchanged since evaluation",
        Request("candidate", "3", champion_at_eval="2"),
        "2",
        HEALTHY_2,
        {},
        "deploy",
        "3",
        True,
    ),
    (
        "first ever candidate (no champion then, none now)",
        Request("candidate", "1", champion_at_eval=None),
        None,
        NOTHING,
        {},
        "deploy",
        "1",
        True,
    ),
    (
        "candidate superseded: a promotion moved @champion after the evaluation",
        Request("candidate", "3", champion_at_eval="1"),
        "2",
        HEALTHY_2,
        {},
        "skip",
        "3",
        False,
    ),
    (
        "candidate retried after it went live but before @champion moved",
        Request("candidate", "3", champion_at_eval="2"),
        "2",
        Live("3", True),
        {},
        "check",
        "3",
        True,
    ),
    (
        "promotion: @champion names another version than the live one",
        Request("champion", retry_failed=True),
        "1",
        HEALTHY_2,
        {},
        "deploy",
        "1",
        False,
    ),
    (
        "promotion echo: @champion already live and healthy",
        Request("champion"),
        "2",
        HEALTHY_2,
        {},
        "check",
        "2",
        False,
    ),
    (
        "heal: @champion is the live version but the server is down",
        Request("champion"),
        "2",
        DOWN_2,
        {},
        "deploy",
        "2",
        False,
    ),
    (
        "restart: nothing serves, @champion exists",
        Request("champion"),
        "2",
        NOTHING,
        {},
        "deploy",
        "2",
        False,
    ),
    ("no @champion at all", Request("champion"), None, NOTHING, {}, "skip", None, False),
    (
        "reconcile does not retry a version that failed verification",
        Request("champion", reason="reconcile: ..."),
        "3",
        HEALTHY_2,
        FAILED_EARLIER,
        "fail",
        "3",
        False,
    ),
    (
        "a person promoting a failed version again retries it",
        Request("champion", retry_failed=True, run_id="run-b"),
        "3",
        HEALTHY_2,
        FAILED_EARLIER,
        "deploy",
        "3",
        False,
    ),
    (
        "a manual deploy of a failed version retries it",
        Request("version", "3", run_id="run-b"),
        "2",
        HEALTHY_2,
        FAILED_EARLIER,
        "deploy",
        "3",
        True,
    ),
    (
        "...but a retry of the run that failed it does not",
        Request("version", "3", run_id="run-a"),
        "2",
        HEALTHY_2,
        FAILED_EARLIER,
        "fail",
        "3",
        False,
    ),
    (
        "a nightly candidate that failed verification is never retried",
        Request("candidate", "3", champion_at_eval="2", run_id="run-c"),
        "2",
        HEALTHY_2,
        FAILED_EARLIER,
        "fail",
        "3",
        False,
    ),
    (
        "manual rollback to an older version",
        Request("version", "1"),
        "2",
        HEALTHY_2,
        {},
        "deploy",
        "1",
        True,
    ),
]


@pytest.mark.parametrize(
    ("request_", "champion", "live", "failed", "action", "version", "promote"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_plan(request_, champion, live, failed, action, version, promote):
    decided = plan(request_, champion=champion, live=live, failed=failed)
    assert isinstance(decided, Plan)
    assert (decided.action, decided.version, decided.promote) == (action, version, promote)
    assert decided.reason


@pytest.mark.parametrize(
    ("live", "action", "strategy"),
    [
        (HEALTHY_2, "deploy", "canary"),  # a healthy other version to compare with
        (NOTHING, "deploy", "direct"),  # the first version: nothing to compare with
        (DOWN_2, "deploy", "direct"),  # what is live does not answer: no baseline
        (Live("3", True), "check", "direct"),  # already live: only verified
    ],
    ids=["healthy-live", "nothing-live", "live-down", "already-live"],
)
def test_a_canary_needs_a_healthy_version_live_to_compare_with(live, action, strategy):
    decided = plan(Request("version", "3"), champion="2", live=live, strategy="canary")
    assert (decided.action, decided.strategy) == (action, strategy)
    if action == "deploy" and strategy == "direct":
        assert "canary needs a healthy version live" in decided.reason


def test_a_verdict_of_this_run_fails_its_retry_whatever_is_live_now():
    """A retried rollout pod must not find the restored version live and report success."""
    retried = Request("champion", retry_failed=True, run_id="run-a", champion_at_request="4")
    decided = plan(retried, champion="3", live=Live("3", True), judged_here=("4", "row 0 off"))
    assert decided.action == "fail" and decided.version == "4"
    assert "row 0 off" in decided.reason


def test_superseded_reason_names_both_champions():
    decided = plan(Request("candidate", "3", champion_at_eval="1"), champion="2", live=HEALTHY_2)
    assert "v1" in decided.reason and "v2" in decided.reason


@pytest.mark.parametrize(
    "data",
    [
        {"kind": "candidate", "version": "7", "champion_at_eval": 6, "run_id": "r"},
        {"kind": "champion", "retry_failed": True, "reason": "promotion"},
        {"kind": "version", "version": 3, "strategy": "canary"},
    ],
)
def test_request_round_trips_through_json(data):
    import json

    request = Request.from_dict(json.dumps(data))
    assert Request.from_dict(request.to_dict()) == request
    if "version" in data:
        assert request.version == str(data["version"])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"kind": "nightly"}, "unknown rollout request kind"),
        ({"kind": "version"}, "needs a version number"),
        ({"kind": "candidate", "version": "@champion"}, "needs a version number"),
        ({"kind": "champion", "versoin": "3"}, "unknown rollout request field"),
        ({"kind": "champion", "strategy": "blue-green"}, "unknown rollout strategy"),
    ],
)
def test_bad_requests_say_what_is_wrong(data, message):
    with pytest.raises(ValueError, match=message):
        Request.from_dict(data)
