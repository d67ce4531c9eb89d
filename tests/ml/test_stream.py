"""ml.stream: the row hash, streamed statistics, the validation split and the epoch batches.

The batch tests shrink the read batch and the shuffle pool so a few thousand rows take every
path a large window takes (several fragments interleaved, several pools, carried rows).
"""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pytest

from ml import stream
from ml.data import discover_partitions, window_days, window_source
from ml.evaluate import MetricsAccumulator, regression_metrics
from ml.schema import load_schema
from ml.settings import DataSettings
from ml.synthetic import materialize_synthetic


@pytest.fixture
def small_pools(monkeypatch):
    monkeypatch.setattr(stream, "READ_BATCH_ROWS", 100)
    monkeypatch.setattr(stream, "SHUFFLE_POOL_ROWS", 350)


def window(tmp_path, rows_per_day=400, days=5, **overrides) -> stream.WindowSource:
    settings = DataSettings(
        path=str(tmp_path / "data"), synthetic_rows_per_day=rows_per_day, **overrides
    )
    days_ = window_days(date(2024, 3, 8), days)
    materialize_synthetic(settings, days_)
    partitions = discover_partitions(settings, days_)
    return window_source(partitions, load_schema(settings), settings, "train")


def test_row_hash_is_pinned_and_reads_values_not_storage():
    rows = np.array([[1.0, 2.5, -0.0], [1.0, 2.5, 0.0], [np.nan, 0.0, 3.0]])
    hashes = stream.row_hash(rows)
    # Pinned: a change to the hash would silently move every holdout row to another side.
    assert int(hashes[0]) == 0x2EB8794A3B91DFC7
    assert hashes[0] == hashes[1]  # -0.0 is 0.0
    assert stream.row_hash(np.array([[float("nan"), 0.0, 3.0]]))[0] == hashes[2]
    assert stream.row_hash(rows[:, ::-1])[0] != hashes[0]  # column order matters
    ints = np.array([[1, 2, 3]], dtype="int64")
    assert stream.row_hash(ints)[0] == stream.row_hash(ints.astype("float64"))[0]


def test_holdout_fraction_and_seed():
    hashes = stream.row_hash(np.random.default_rng(0).normal(size=(20_000, 3)))
    mask = stream.holdout_mask(hashes, 0.2, seed=1)
    assert mask.mean() == pytest.approx(0.2, abs=0.01)
    assert np.array_equal(mask, stream.holdout_mask(hashes, 0.2, seed=1))
    assert not np.array_equal(mask, stream.holdout_mask(hashes, 0.2, seed=2))
    # Holdout and validation decisions are independent of each other.
    validation = stream.validation_rank(hashes, 1) < 0.5
    assert validation[mask].mean() == pytest.approx(0.5, abs=0.03)


def test_running_stats_merge_batches_like_numpy():
    values = np.random.default_rng(1).normal(loc=[5.0, -300.0], scale=[2.0, 0.01], size=(999, 2))
    stats = stream.RunningStats(2)
    for start in range(0, 999, 128):
        stats.update(values[start : start + 128])
    assert stats.n == 999
    np.testing.assert_allclose(stats.mean, values.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.variance, values.var(axis=0), rtol=1e-9)


def test_bottom_k_keeps_the_smallest_ranks_in_stream_order(monkeypatch):
    monkeypatch.setattr(stream, "READ_BATCH_ROWS", 10)  # prune often
    rng = np.random.default_rng(2)
    ranks = rng.random(1000)
    rows = np.arange(1000, dtype="float64").reshape(-1, 1)
    kept = stream.BottomK(50)
    for start in range(0, 1000, 37):
        chunk = slice(start, start + 37)
        kept.add(ranks[chunk], rows[chunk], np.arange(1000)[chunk])
    sample, threshold = kept.result()
    expected = np.sort(np.argsort(ranks)[:50])
    np.testing.assert_array_equal(sample[:, 0], expected)
    assert threshold == np.sort(ranks)[50]


def test_metrics_accumulated_over_batches_equal_the_whole():
    rng = np.random.default_rng(3)
    truth = rng.normal(40.0, 8.0, size=1001)
    pred = truth + rng.normal(0.0, 1.5, size=1001)
    accumulator = MetricsAccumulator()
    for start in range(0, 1001, 64):
        accumulator.update(truth[start : start + 64], pred[start : start + 64])
    assert accumulator.result() == pytest.approx(regression_metrics(truth, pred), rel=1e-10)
    with pytest.raises(ValueError, match="zero rows"):
        MetricsAccumulator().result()


def test_prepare_training_splits_by_hash_and_computes_the_training_statistics(tmp_path):
    source = window(tmp_path)
    rows = np.concatenate([values for values, _ in source.batches()])
    data = stream.prepare_training(source, 0.15, seed=7, max_validation_rows=10_000)

    in_validation = stream.validation_rank(stream.row_hash(rows), 7) < 0.15
    assert data.validation_threshold == 0.15
    assert data.validation_rows == in_validation.sum()
    assert data.train_rows + data.validation_rows == len(rows)
    np.testing.assert_array_equal(data.validation_y, rows[in_validation, -1].astype("float32"))
    train = rows[~in_validation]
    np.testing.assert_allclose(data.feature_mean, train[:, :-1].mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(data.feature_variance, train[:, :-1].var(axis=0), rtol=1e-8)
    assert data.target_std == pytest.approx(train[:, -1].std(), rel=1e-10)


def test_a_capped_validation_set_is_a_bounded_sample(tmp_path):
    source = window(tmp_path)
    data = stream.prepare_training(source, 0.5, seed=7, max_validation_rows=100)
    assert data.validation_rows == 100
    assert data.validation_threshold < 0.5
    assert data.train_rows == len(np.concatenate([v for v, _ in source.batches()])) - 100


def test_prepare_training_refuses_missing_values():
    frame = pd.DataFrame({"x": [1.0, np.nan, 3.0] * 10, "y": np.arange(30.0)})
    with pytest.raises(ValueError, match=r"missing values: \['x'\]"):
        stream.prepare_training(stream.FrameSource(frame, ["x", "y"]), 0.2, 0, 100)


@pytest.mark.usefixtures("small_pools")
def test_each_epoch_yields_every_training_row_once_shuffled_and_reproducibly(tmp_path):
    source = window(tmp_path, rows_per_day=300)
    assert len(source.fragments()) == 5
    data = stream.prepare_training(source, 0.15, seed=3, max_validation_rows=10_000)
    epochs = stream.training_batches(source, data, seed=3, batch_size=64)

    first = list(epochs())
    second = list(epochs())
    sizes = [len(y) for _, y in first]
    assert sizes[:-1] == [64] * (len(sizes) - 1) and 0 < sizes[-1] <= 64
    assert len(sizes) == -(-data.train_rows // 64)

    def rows(batches):
        return np.column_stack(
            [np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])]
        )

    one, two = rows(first), rows(second)
    assert len(one) == data.train_rows
    # The same rows each epoch, in another order; never a validation row.
    key = np.lexsort(one.T)
    np.testing.assert_array_equal(one[key], two[np.lexsort(two.T)])
    assert not np.array_equal(one, two)
    validation = {tuple(r) for r in np.column_stack([data.validation_x, data.validation_y])}
    assert not validation & {tuple(r) for r in one}
    # Rows from several days share a batch (fragments are interleaved, then shuffled).
    temperatures = first[0][0][:, 0]
    assert len(np.unique(np.round(temperatures))) > 5

    # Same seed, same sequence of batches; another seed, another.
    again = stream.training_batches(source, data, seed=3, batch_size=64)
    for (x1, y1), (x2, y2) in zip(first, list(again()), strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    other = list(stream.training_batches(source, data, seed=4, batch_size=64)())
    assert not np.array_equal(other[0][1], first[0][1])


@pytest.mark.integration
@pytest.mark.usefixtures("small_pools")
def test_two_trainings_on_the_same_streamed_window_give_the_same_model(tmp_path, mlflow_store):
    from ml.evaluate import predict
    from ml.settings import TrainingSettings
    from ml.train import train_model

    source = window(tmp_path, rows_per_day=300)
    settings = TrainingSettings(
        epochs=2, hidden_units=[8], batch_size=32, max_batch_size=128, min_steps_per_epoch=8
    )
    features, target = source.columns[:-1], source.columns[-1]
    first = train_model(source, features, target, settings, experiment_name="stream")
    second = train_model(source, features, target, settings, experiment_name="stream")

    rows = pd.DataFrame(np.concatenate([v for v, _ in source.batches()])[:, :-1], columns=features)
    np.testing.assert_array_equal(
        predict(first.model_uri, rows, features), predict(second.model_uri, rows, features)
    )
    import mlflow

    params = mlflow.get_run(first.run_id).data.params
    assert params["effective_batch_size"] == "128"  # grown from 32: ~1200 rows, >= 8 steps
