"""MicroBatcher on plain Python models: who shares a call, and who gets which answer or error."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from serving.server.batching import MAX_DEFERRED_TURNS, MicroBatcher


class Model:
    """Sums each row; records every call's row count and thread; fails on negative input."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.threads: list[str] = []

    def __call__(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=float)
        self.calls.append(len(rows))
        self.threads.append(threading.current_thread().name)
        if np.any(rows < 0):
            raise ValueError("negative input")
        return rows.sum(axis=1)


def run_together(batcher: MicroBatcher, inputs: list) -> list:
    """Submit every input in the same loop turn (what a burst of requests does), then close."""

    async def scenario():
        results = await asyncio.gather(
            *(batcher.predict(x) for x in inputs), return_exceptions=True
        )
        await batcher.close()
        return results

    return asyncio.run(scenario())


def test_concurrent_requests_share_one_call_and_each_gets_its_own_rows():
    model = Model()
    inputs = [np.full((n, 2), float(n)) for n in (1, 3, 2)]
    results = run_together(MicroBatcher(model), inputs)
    assert model.calls == [6]
    assert [r.tolist() for r in results] == [[2.0], [6.0, 6.0, 6.0], [4.0, 4.0]]


def test_rows_given_as_lists_are_merged_into_one_array():
    model = Model()
    results = run_together(MicroBatcher(model), [[[1.0, 2.0]], [[3.0, 4.0], [5.0, 6.0]]])
    assert model.calls == [3]
    assert [r.tolist() for r in results] == [[3.0], [7.0, 11.0]]


def trickle(batcher: MicroBatcher, burst: int, turns: int) -> list:
    """A burst of ``burst`` requests in one turn, answered; then as many again, one request per
    loop turn every ``turns`` turns (a proxy hands requests over one at a time)."""

    async def scenario():
        await asyncio.gather(*(batcher.predict([[1.0, 0.0]]) for _ in range(burst)))
        loop, futures = asyncio.get_running_loop(), []

        def arrive(k: int, wait: int) -> None:
            if wait:
                loop.call_soon(arrive, k, wait - 1)
                return
            futures.append(batcher.submit([[float(k), 0.0]]))
            if k + 1 < burst:
                loop.call_soon(arrive, k + 1, turns - 1)

        arrive(0, 0)
        while len(futures) < burst:
            await asyncio.sleep(0)
        results = await asyncio.gather(*futures)
        await batcher.close()
        return [r.tolist() for r in results]

    return asyncio.run(scenario())


def test_a_burst_handed_over_one_request_per_loop_turn_still_shares_one_call():
    model = Model()
    assert trickle(MicroBatcher(model), burst=6, turns=1) == [
        [0.0],
        [1.0],
        [2.0],
        [3.0],
        [4.0],
        [5.0],
    ]
    assert model.calls == [6, 6]


def test_a_batch_waits_a_bounded_number_of_turns_for_the_rest_of_a_burst():
    model = Model()  # the next request comes after more turns than a batch waits: two calls
    trickle(MicroBatcher(model), burst=2, turns=MAX_DEFERRED_TURNS + 2)
    assert model.calls == [2, 1, 1]


def test_a_lone_request_is_one_call_of_its_own():
    model = Model()
    [result] = run_together(MicroBatcher(model), [np.ones((4, 3))])
    assert model.calls == [4] and result.tolist() == [3.0] * 4


def test_batches_stop_at_max_batch_rows_and_a_bigger_request_runs_alone():
    model = Model()
    inputs = [np.ones((2, 1))] * 3 + [np.ones((9, 1))] + [np.ones((1, 1))]
    results = run_together(MicroBatcher(model, max_batch_rows=4), inputs)
    assert sum(model.calls) == 16 and 9 in model.calls  # the big one ran alone
    assert all(c <= 4 for c in model.calls if c != 9)
    assert [len(r) for r in results] == [2, 2, 2, 9, 1]


def test_a_failing_batch_is_retried_request_by_request():
    model = Model()
    observed = []
    batcher = MicroBatcher(
        model, max_wait_s=0.005, mode="thread", on_batch=lambda *a: observed.append(a)
    )
    inputs = [np.full((1, 2), float(i)) for i in range(5)] + [np.full((2, 2), -1.0)]
    results = run_together(batcher, inputs)
    assert [float(r[0]) for r in results[:5]] == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert isinstance(results[5], ValueError)
    assert observed == [(7, 6, True)]  # one batch of 6 requests (7 rows), re-run one by one


def test_a_model_that_answers_the_wrong_number_of_rows_fails_only_that_request():
    def short(rows):
        rows = np.asarray(rows)
        return rows.sum(axis=1)[: max(1, len(rows) - 1)]  # drops the last row when it can

    results = run_together(MicroBatcher(short), [np.ones((1, 2)), np.ones((2, 2))])
    assert results[0].tolist() == [2.0]
    assert isinstance(results[1], ValueError) and "rows for 2" in str(results[1])


def test_auto_mode_runs_small_batches_inline_and_big_ones_in_the_model_thread():
    model = Model()
    batcher = MicroBatcher(model, inline_max_rows=4)

    async def scenario():
        await batcher.predict(np.ones((2, 1)))
        await batcher.predict(np.ones((10, 1)))
        await batcher.close()

    asyncio.run(scenario())
    assert model.calls == [2, 10]
    assert model.threads[0] == threading.main_thread().name
    assert model.threads[1].startswith("model")


def test_a_cancelled_request_is_dropped_before_its_batch_runs():
    model = Model()

    async def scenario():
        batcher = MicroBatcher(model)
        gone = batcher.submit(np.ones((5, 1)))
        kept = batcher.submit(np.ones((1, 1)))
        gone.cancel()
        result = await kept
        await batcher.close()
        return result

    assert asyncio.run(scenario()).tolist() == [1.0]
    assert model.calls == [1]


def test_a_closed_batcher_refuses_new_work():
    async def scenario():
        batcher = MicroBatcher(Model())
        await batcher.predict(np.ones((1, 1)))
        await batcher.close()
        batcher.submit(np.ones((1, 1)))

    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(scenario())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_rows": 0}, "max_batch_rows"),
        ({"max_wait_s": 1.0}, "max_wait_s"),
        ({"mode": "gpu"}, "unknown mode"),
    ],
)
def test_bad_settings_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MicroBatcher(Model(), **kwargs)


def test_every_successful_model_call_hands_its_rows_and_outputs_to_the_observer():
    model = Model()
    calls = []
    batcher = MicroBatcher(model, on_outputs=lambda rows, out: calls.append((rows, out)))
    run_together(batcher, [[[1.0, 2.0]], [[3.0, 4.0], [5.0, 6.0]]])
    [(rows, outputs)] = calls  # one merged call: its input array and output array
    assert np.asarray(rows).tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    assert outputs.tolist() == [3.0, 7.0, 11.0]

    calls.clear()
    lone = [[7.0, 8.0]]
    run_together(MicroBatcher(model, on_outputs=lambda r, o: calls.append((r, o))), [lone])
    assert calls[0][0] is lone and calls[0][1].tolist() == [15.0]  # by reference


def test_after_a_failed_batch_only_the_calls_that_succeeded_are_observed():
    calls = []
    batcher = MicroBatcher(
        Model(), max_wait_s=0.005, on_outputs=lambda rows, out: calls.append((rows, out))
    )
    inputs = [np.full((1, 2), 1.0), np.full((2, 2), -1.0), np.full((1, 2), 3.0)]
    results = run_together(batcher, inputs)
    assert isinstance(results[1], ValueError)
    assert [(r.tolist(), o.tolist()) for r, o in calls] == [
        ([[1.0, 1.0]], [2.0]),
        ([[3.0, 3.0]], [6.0]),
    ]


def test_dataframes_share_one_call_through_merge_and_take_and_a_bad_one_fails_alone():
    import pandas as pd

    calls: list[int] = []

    def predict(frame: pd.DataFrame) -> pd.DataFrame:
        calls.append(len(frame))
        if (frame["a"] < 0).any():
            raise ValueError("negative input")
        return pd.DataFrame({"twice": frame["a"] * 2})

    batcher = MicroBatcher(
        predict,
        mode="thread",
        merge=lambda frames: pd.concat(frames, ignore_index=True),
        take=lambda out, start, stop: out.iloc[start:stop],
        count=len,
    )
    frames = [
        pd.DataFrame({"a": [1.0, 2.0]}),
        pd.DataFrame({"a": [-1.0]}),
        pd.DataFrame({"a": [5.0]}),
    ]
    good, bad, other = run_together(batcher, frames)
    assert calls == [4, 2, 1, 1]  # the shared call failed: each request on its own
    assert good["twice"].tolist() == [2.0, 4.0] and other["twice"].tolist() == [10.0]
    assert isinstance(bad, ValueError)


def test_a_merge_that_fails_counts_as_a_failed_shared_call():
    def merge(parts):
        if len(parts) > 1:
            raise ValueError("cannot merge")
        return parts[0]

    model = Model()
    batcher = MicroBatcher(model, merge=merge, take=lambda o, a, b: o[a:b], count=len)
    results = run_together(batcher, [np.ones((1, 2)), np.ones((2, 2))])
    assert model.calls == [1, 2]
    assert [r.tolist() for r in results] == [[2.0], [2.0, 2.0]]
