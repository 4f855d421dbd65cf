"""Probe measures against numpy and direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bn_core.probes import (
    BAND_PERCENTILES,
    EXACT_PERCENTILE_VALUES,
    FIG1_PERCENTILES,
    PERCENTILE_BINS,
    postact_range,
    quantiles_of_sorted,
    row_histogram,
    row_histogram_and_percentiles,
    row_percentiles,
    row_std,
    saturation_fraction,
)

HYP = settings(max_examples=40, deadline=None)


def test_percentile_constants():
    assert FIG1_PERCENTILES == (15.0, 50.0, 85.0)
    assert BAND_PERCENTILES == (0.0, 6.68, 15.87, 30.85, 50.0, 69.15, 84.13, 93.32, 100.0)
    # The bands are the normal CDF at -1.5 .. 1.5 sigma in steps of 0.5.
    for p, z in zip(BAND_PERCENTILES[1:-1], np.arange(-1.5, 1.51, 0.5), strict=True):
        assert abs(100 * 0.5 * (1 + math.erf(z / math.sqrt(2))) - p) < 0.01


@pytest.mark.parametrize("n", [1, 2, 3, 7, 300, 1001])
@pytest.mark.parametrize("percentiles", [FIG1_PERCENTILES, BAND_PERCENTILES, (0.0, 100.0, 33.3)])
def test_quantiles_equal_numpy_percentile(n, percentiles):
    rng = np.random.default_rng(n)
    rows = rng.normal(size=(5, n)) * rng.uniform(0.1, 10, size=(5, 1))
    got = quantiles_of_sorted(torch.from_numpy(np.sort(rows, axis=1)), percentiles)
    want = np.percentile(rows, percentiles, axis=1).T
    assert got.shape == (5, len(percentiles))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_quantiles_float32_and_batched_leading_dims():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(2, 3, 50)).astype(np.float32)
    got = quantiles_of_sorted(torch.from_numpy(np.sort(rows, axis=-1)), FIG1_PERCENTILES)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 3)
    want = np.moveaxis(np.percentile(rows.astype(np.float64), FIG1_PERCENTILES, axis=-1), 0, -1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


@HYP
@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False), min_size=1, max_size=60),
    st.lists(st.floats(0, 100), min_size=1, max_size=5),
)
def test_quantiles_property(values, percentiles):
    row = np.array(values)
    got = quantiles_of_sorted(torch.from_numpy(np.sort(row))[None], tuple(percentiles))[0]
    want = np.percentile(row, percentiles)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize("threshold", [0.97, 0.9, 0.6])
def test_saturation_sigmoid(threshold):
    rng = np.random.default_rng(1)
    post = 1 / (1 + np.exp(-rng.normal(scale=4, size=(3, 40, 16))))
    got = saturation_fraction(torch.from_numpy(post), "sigmoid", threshold)
    want = ((post < 1 - threshold) | (post > threshold)).reshape(3, -1).mean(1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    assert want.min() > 0 and want.max() < 1


@pytest.mark.parametrize("threshold", [0.97, 0.8])
def test_saturation_tanh(threshold):
    rng = np.random.default_rng(2)
    post = np.tanh(rng.normal(scale=3, size=(2, 30, 8, 3, 3)))
    got = saturation_fraction(torch.from_numpy(post), "tanh", threshold)
    want = (np.abs(post) > threshold).reshape(2, -1).mean(1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


def test_saturation_relu_dead_units_dense():
    rng = np.random.default_rng(3)
    pre = rng.normal(size=(2, 25, 10))
    pre[0, :, [1, 4, 7]] = -np.abs(pre[0, :, [1, 4, 7]])  # 3 of 10 units never fire
    pre[1, :, 0] = -1.0  # 1 of 10
    pre[1, 3, 5] = -1.0  # inactive on one example only: alive
    post = np.maximum(pre, 0)
    got = saturation_fraction(torch.from_numpy(post), "relu", 0.97)
    want = (post.max(axis=1) <= 0).mean(1)  # a unit is dead if no example activates it
    np.testing.assert_allclose(got.numpy(), want)
    np.testing.assert_allclose(got.numpy(), [0.3, 0.1])


def test_saturation_relu_dead_channels_conv():
    rng = np.random.default_rng(4)
    pre = rng.normal(size=(3, 6, 4, 5, 5))  # (rows, N, C, H, W)
    pre[0, :, 2] = -1.0
    pre[2, :, 0] = -1.0
    pre[2, :, 3] = -1.0
    pre[2, 0, 3, 1, 1] = 2.0  # one position of one example keeps channel 3 alive
    post = np.maximum(pre, 0)
    got = saturation_fraction(torch.from_numpy(post), "relu", 0.97)
    per_channel_max = post.transpose(0, 2, 1, 3, 4).reshape(3, 4, -1).max(-1)
    want = (per_channel_max <= 0).mean(1)
    np.testing.assert_allclose(got.numpy(), want)
    np.testing.assert_allclose(got.numpy(), [0.25, 0.0, 0.25])


def test_postact_range():
    assert postact_range("sigmoid", 8.0) == (0.0, 1.0)
    assert postact_range("tanh", 8.0) == (-1.0, 1.0)
    assert postact_range("relu", 5.0) == (0.0, 5.0)


@pytest.mark.parametrize("shape", [(1, 2), (2, 6400), (8, 333)])
def test_row_std_is_the_sample_std_of_each_row(shape):
    rng = np.random.default_rng(sum(shape))
    rows = rng.normal(3.0, 0.5, size=shape) * rng.uniform(0.1, 10, size=(shape[0], 1))
    got = row_std(torch.from_numpy(rows))
    np.testing.assert_allclose(got.numpy(), rows.std(axis=1, ddof=1), rtol=1e-12)
    got32 = row_std(torch.from_numpy(rows).float())
    np.testing.assert_allclose(got32.numpy(), rows.std(axis=1, ddof=1), rtol=1e-5)


# --- percentiles and histograms of the probe's rows --------------------------------------
ALL_PERCENTILES = FIG1_PERCENTILES + BAND_PERCENTILES


@pytest.mark.parametrize("n", [5, 300, EXACT_PERCENTILE_VALUES])
def test_row_percentiles_are_exact_up_to_the_limit(n):
    rows = np.random.default_rng(n).normal(size=(4, n)).astype(np.float32)
    got = row_percentiles(torch.from_numpy(rows), ALL_PERCENTILES).numpy()
    want = np.percentile(rows.astype(np.float64), ALL_PERCENTILES, axis=1).T
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", ["normal", "heavy-tailed", "two-clusters", "ties"])
def test_long_row_percentiles_are_within_one_bin_of_numpy(shape):
    # Above the limit they come from a histogram of PERCENTILE_BINS bins between the row's
    # min and max: within one bin width of numpy.percentile, the extremes exact.
    rng = np.random.default_rng(7)
    n = 30_000
    rows = rng.normal(size=(3, n))
    if shape == "heavy-tailed":
        rows = rows**3 * 5
    elif shape == "two-clusters":
        rows = np.where(rng.random((3, n)) < 0.3, rows - 40, rows + 3)
    elif shape == "ties":
        rows = np.round(rows, 1)
    rows = rows.astype(np.float32)
    got = row_percentiles(torch.from_numpy(rows), ALL_PERCENTILES).numpy()
    want = np.percentile(rows.astype(np.float64), ALL_PERCENTILES, axis=1).T
    width = (rows.max(1) - rows.min(1))[:, None] / PERCENTILE_BINS
    assert np.all(np.abs(got - want) <= width * 1.0001 + 1e-6)
    ends = [ALL_PERCENTILES.index(0.0), ALL_PERCENTILES.index(100.0)]
    np.testing.assert_array_equal(got[:, ends], np.stack([rows.min(1), rows.max(1)], 1))


def test_long_constant_row_has_its_value_as_every_percentile():
    rows = torch.full((2, 10_000), 2.5)
    assert torch.equal(row_percentiles(rows, ALL_PERCENTILES), torch.full((2, 12), 2.5))


def test_row_histogram_equals_numpy_with_outside_values_folded_in():
    rng = np.random.default_rng(3)
    rows = (rng.normal(size=(3, 5000)) * 2).astype(np.float32)
    rows[0, :3] = [np.nan, np.inf, -np.inf]
    counts, outside = row_histogram(torch.from_numpy(rows), -3.0, 3.0, 60)
    edges = np.linspace(-3, 3, 61)
    for r in range(3):
        values = rows[r][np.isfinite(rows[r])]
        inner = values[(values >= -3) & (values < 3)]
        want = np.histogram(inner, edges)[0]
        want[0] += np.sum(values < -3)
        want[-1] += np.sum(values >= 3) + np.sum(~np.isfinite(rows[r]) & (rows[r] != -np.inf))
        want[0] += np.sum(rows[r] == -np.inf)
        # numpy puts a value in bin floor((x + 3) / 0.1) up to rounding at the edges
        assert np.abs(counts[r].numpy() - want).sum() <= 4
        assert counts[r].sum() == rows.shape[1]
        out = np.sum((rows[r] < -3) | (rows[r] >= 3) | np.isnan(rows[r])) / rows.shape[1]
        assert outside[r].item() == pytest.approx(out)


@pytest.mark.parametrize("bins", [60, 7, 200])
def test_one_binning_gives_the_histogram_and_percentiles_of_two(bins):
    # A block like a logged step's. Rows whose percentile ranks all fall inside the display
    # range get their percentiles from the fine histogram (within one fine bin of numpy,
    # extremes exact), a few values outside included; a row with so many values outside
    # that a rank falls there gets row_percentiles' own. The counts and the shares outside
    # are row_histogram's.
    rng = np.random.default_rng(bins)
    n = 30_000
    rows = rng.normal(size=(6, n)) * np.array([[0.5], [1.5], [2.0], [1.0], [1.0], [1.0]])
    rows[3, :40] = 9.5  # 40 values above: every rank still lies inside
    rows[4, :200] = -np.inf  # 200 below: so does the 0.67th percentile's
    rows[5, : n // 10] = -9.0  # 10 % below: the 6.68th percentile's rank lies there
    rows = rows.astype(np.float32)
    t = torch.from_numpy(rows)
    counts, outside, got = row_histogram_and_percentiles(t, -8.0, 8.0, bins, ALL_PERCENTILES)
    want_counts, want_outside = row_histogram(t, -8.0, 8.0, bins)
    # Summed fine bins against direct coarse ones: equal up to rounding at a bin edge.
    assert (counts - want_counts).abs().sum() <= 2
    assert torch.equal(counts.sum(1), torch.full((6,), n))
    assert torch.equal(outside, want_outside)
    fine_bins = bins * 2 ** math.ceil(math.log2(max(1.0, PERCENTILE_BINS / bins)))
    assert fine_bins >= PERCENTILE_BINS
    with np.errstate(invalid="ignore"):  # row 4's -inf makes numpy's 0th percentile NaN
        want = np.percentile(rows.astype(np.float64), ALL_PERCENTILES, axis=1).T
    ends = [ALL_PERCENTILES.index(0.0), ALL_PERCENTILES.index(100.0)]
    middle = [i for i in range(len(ALL_PERCENTILES)) if i not in ends]
    from_counts = got[:5].numpy()
    assert np.all(np.abs(from_counts[:, middle] - want[:5, middle]) <= 16.0 / fine_bins * 1.0001)
    np.testing.assert_array_equal(from_counts[:, ends], np.stack([rows.min(1), rows.max(1)], 1)[:5])
    assert torch.equal(got[5], row_percentiles(t[5:], ALL_PERCENTILES)[0])


def test_short_rows_get_exact_percentiles_with_their_histogram():
    rows = torch.from_numpy(np.random.default_rng(4).normal(size=(3, 300)).astype(np.float32))
    counts, outside, got = row_histogram_and_percentiles(rows, -3.0, 3.0, 60, ALL_PERCENTILES)
    want_counts, want_outside = row_histogram(rows, -3.0, 3.0, 60)
    assert torch.equal(counts, want_counts) and torch.equal(outside, want_outside)
    assert torch.equal(got, row_percentiles(rows, ALL_PERCENTILES))
