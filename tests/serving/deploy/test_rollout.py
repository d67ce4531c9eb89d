"""The rollout path's decision (``plan``, pure) as a table, and the request it reads."""

from __future__ import annotations

import pytest

from serving.deploy.rollout import FAILED_BY_TAG, FAILED_TAG, Live, Plan, Request, plan

HEALTHY_1 = Live("1", True)
HEALTHY_2 = Live("2", True)
DOWN_2 = Live("2", False, "the model server on port 5011 is down")
NOTHING = Live(None, False, "nothing deployed")
# The tags of a version whose gate passed (the gate writes gate.passed and more).
GATED = {"gate.passed": "true"}
FAILED_EARLIER = {
    **GATED,
    FAILED_TAG: "first at row 0: endpoint 1.0, expected 2.0",
    FAILED_BY_TAG: "run-a",
}
REJECTED = {"gate.passed": "false", "gate.reasons": "holdout RMSE 3.2 > bar 3"}
FORCED = {**REJECTED, "force": "INC-42: v2 answers nonsense, v3 is the lesser evil"}

CASES = [
    # (name, request, champion, live, the target version's tags, expected action, version,
    # promote)
    (
        "nightly candidate, champion unchanged since evaluation",
        Request("candidate", "3", champion_at_eval="2"),
        "2",
        HEALTHY_2,
        GATED,
        "deploy",
        "3",
        True,
    ),
    (
        "first ever candidate (no champion then, none now)",
        Request("candidate", "1", champion_at_eval=None),
        None,
        NOTHING,
        GATED,
        "deploy",
        "1",
        True,
    ),
    (
        "candidate superseded: a promotion moved @champion after the evaluation",
        Request("candidate", "3", champion_at_eval="1"),
        "2",
        HEALTHY_2,
        GATED,
        "skip",
        "3",
        False,
    ),
    (
        "candidate retried after it went live but before @champion moved",
        Request("candidate", "3", champion_at_eval="2"),
        "2",
        Live("3", True),
        GATED,
        "check",
        "3",
        True,
    ),
    (
        "promotion: @champion names another version than the live one",
        Request("champion", retry_failed=True),
        "1",
        HEALTHY_2,
        GATED,
        "deploy",
        "1",
        False,
    ),
    (
        "promotion echo: @champion already live and healthy",
        Request("champion"),
        "2",
        HEALTHY_2,
        GATED,
        "check",
        "2",
        False,
    ),
    (
        "heal: @champion is the live version but the server is down",
        Request("champion"),
        "2",
        DOWN_2,
        GATED,
        "deploy",
        "2",
        False,
    ),
    (
        "restart: nothing serves, @champion exists",
        Request("champion"),
        "2",
        NOTHING,
        GATED,
        "deploy",
        "2",
        False,
    ),
    ("no @champion at all", Request("champion"), None, NOTHING, GATED, "skip", None, False),
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
        GATED,
        "deploy",
        "1",
        True,
    ),
    # The invariant: only a version with a passed gate, or a person's `force` reason, goes live.
    (
        "hand promotion of a version that was never gated",
        Request("champion", retry_failed=True),
        "3",
        HEALTHY_2,
        {},
        "refuse",
        "3",
        False,
    ),
    (
        "hand promotion of a version the gate rejected",
        Request("champion", retry_failed=True),
        "3",
        HEALTHY_2,
        REJECTED,
        "refuse",
        "3",
        False,
    ),
    (
        "...with a force reason on the version",
        Request("champion", retry_failed=True),
        "3",
        HEALTHY_2,
        FORCED,
        "deploy",
        "3",
        False,
    ),
    (
        "a blank force tag is no reason",
        Request("champion", retry_failed=True),
        "3",
        HEALTHY_2,
        {**REJECTED, "force": "  "},
        "refuse",
        "3",
        False,
    ),
    (
        "manual deploy of a version that was never gated",
        Request("version", "3"),
        "2",
        HEALTHY_2,
        {},
        "refuse",
        "3",
        False,
    ),
    (
        "an ungated @champion that is already live is not blessed by a check",
        Request("champion"),
        "2",
        HEALTHY_2,
        {},
        "refuse",
        "2",
        False,
    ),
    (
        "a version forced past the gate (force_deploy) carries gate.passed",
        Request("candidate", "3", champion_at_eval="2"),
        "2",
        HEALTHY_2,
        {"gate.passed": "true", "gate.forced": "true"},
        "deploy",
        "3",
        True,
    ),
]


@pytest.mark.parametrize(
    ("request_", "champion", "live", "tags", "action", "version", "promote"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_plan(request_, champion, live, tags, action, version, promote):
    decided = plan(request_, champion=champion, live=live, tags=tags)
    assert isinstance(decided, Plan)
    assert (decided.action, decided.version, decided.promote) == (action, version, promote)
    assert decided.reason


def test_a_forced_plan_carries_the_reason_and_a_refusal_says_what_clears_it():
    forced = plan(Request("version", "3"), champion="2", live=HEALTHY_2, tags=FORCED)
    assert forced.forced == FORCED["force"] and FORCED["force"] in forced.reason
    assert plan(Request("version", "3"), champion="2", live=HEALTHY_2, tags=GATED).forced is None
    refused = plan(Request("version", "3"), champion="2", live=HEALTHY_2, tags=REJECTED)
    assert "holdout RMSE 3.2 > bar 3" in refused.reason and "`force`" in refused.reason
    never = plan(Request("version", "3"), champion="2", live=HEALTHY_2, tags={})
    assert "never gated" in never.reason


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
    decided = plan(Request("version", "3"), champion="2", live=live, tags=GATED, strategy="canary")
    assert (decided.action, decided.strategy) == (action, strategy)
    if action == "deploy" and strategy == "direct":
        assert "canary needs a healthy version live" in decided.reason


@pytest.mark.parametrize("strategy", ["direct", "shadow", "canary"])
@pytest.mark.parametrize(
    "tags", [REJECTED, {}, {"gate.passed": "maybe"}], ids=["rejected", "never-gated", "unclear"]
)
def test_the_rule_of_production_comes_before_the_strategy(strategy, tags):
    """A version that may not go live is refused whatever the strategy: no shadow or canary
    step ever starts for it (its mirrored requests would put it beside the live version)."""
    decided = plan(Request("version", "3"), champion="2", live=HEALTHY_2, tags=tags,
                   strategy=strategy)  # fmt: skip
    assert decided.action == "refuse" and decided.strategy == "direct"


@pytest.mark.parametrize("strategy", ["shadow", "canary"])
def test_a_forced_version_may_go_through_a_progressive_strategy(strategy):
    decided = plan(Request("version", "3"), champion="2", live=HEALTHY_2, tags=FORCED,
                   strategy=strategy)  # fmt: skip
    assert (decided.action, decided.strategy) == ("deploy", strategy)
    assert decided.forced == FORCED["force"]


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
