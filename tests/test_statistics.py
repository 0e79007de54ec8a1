"""Bootstrap intervals over prompts: exact on small cases, and calibrated in simulation.

The simulations draw per-example head scores from a known distribution (per-head means ``mu`` plus noise
shared by two methods and noise of their own), so the true AUC (of ``mu``) and the true difference of
two methods' AUCs are known. A 90% interval must cover the truth in roughly 90% of 200 datasets; the
two wrong bootstraps (resampling heads instead of prompts; resampling the two methods independently)
are run through the same check and must fall outside the band, so the band is what rejects them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chg_tlens.analysis import metrics, statistics
from chg_tlens.analysis.baselines import HeadScores
from chg_tlens.errors import InputError

N_DATASETS, N_EXAMPLES, N_BOOT, N_HEADS = 200, 40, 400, 16
LABELS = np.arange(N_HEADS) < 6
MU_A = np.random.default_rng(1).permutation(np.linspace(0.0, 0.6, N_HEADS)) + 0.15 * LABELS
MU_B = MU_A - 0.2 * (np.arange(N_HEADS) < 3)  # b ranks three of the positives lower
BAND = (0.8, 0.97)


def _datasets():
    """200 seeded datasets of two methods' per-example scores [example, 1, head], sharing prompt noise."""
    rng = np.random.default_rng(0)
    for _ in range(N_DATASETS):
        shared = 0.8 * rng.standard_normal((N_EXAMPLES, N_HEADS))
        a = MU_A + shared + 0.3 * rng.standard_normal((N_EXAMPLES, N_HEADS))
        b = MU_B + shared + 0.3 * rng.standard_normal((N_EXAMPLES, N_HEADS))
        yield a[:, None], b[:, None]


def _coverage(interval_of, truth: float) -> float:
    hits = 0
    for i, (a, b) in enumerate(_datasets()):
        low, high = interval_of(a, b, i)
        hits += low <= truth <= high
    return hits / N_DATASETS


def _percentile(samples: np.ndarray) -> tuple[float, float]:
    low, high = np.quantile(samples, [0.05, 0.95])
    return float(low), float(high)


def test_auc_interval_covers_the_true_auc_about_90_percent_and_resampling_heads_does_not():
    truth = metrics.roc_auc(MU_A, LABELS)
    assert 0.6 < truth < 0.9

    def over_prompts(a, b, seed):
        interval = statistics.bootstrap_auc(a, LABELS, n_boot=N_BOOT, seed=seed)
        return interval.low, interval.high

    def over_heads(a, b, seed):  # wrong: the heads are fixed, the prompts are what was sampled
        means = a.mean(axis=0)[0]
        draws = np.random.default_rng(seed).integers(0, N_HEADS, size=(100, N_HEADS))  # 100: it is slow
        return _percentile(np.array([metrics.roc_auc(means[d], LABELS[d]) for d in draws
                                     if 0 < LABELS[d].sum() < N_HEADS]))

    assert BAND[0] <= _coverage(over_prompts, truth) <= BAND[1]
    assert not BAND[0] <= _coverage(over_heads, truth) <= BAND[1]


def test_paired_difference_covers_the_true_difference_and_unpaired_intervals_do_not():
    truth = metrics.roc_auc(MU_A, LABELS) - metrics.roc_auc(MU_B, LABELS)
    assert truth > 0.1

    def paired(a, b, seed):
        interval = statistics.bootstrap_auc_difference(a, b, LABELS, n_boot=N_BOOT, seed=seed)
        return interval.low, interval.high

    def unpaired(a, b, seed):  # wrong: each method on its own resample, the shared prompt noise counted twice
        first = statistics.bootstrap_auc(a, LABELS, n_boot=N_BOOT, seed=seed).samples
        second = statistics.bootstrap_auc(b, LABELS, n_boot=N_BOOT, seed=seed + 10**6).samples
        return _percentile(first - second)

    assert BAND[0] <= _coverage(paired, truth) <= BAND[1]
    assert not BAND[0] <= _coverage(unpaired, truth) <= BAND[1]


# ------------------------------------------------------------------------------ exact behaviour
def test_estimate_is_the_statistic_of_the_mean_and_resamples_are_seeded():
    per_example = torch.randn(30, 2, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[True, False, False, True], [False, False, True, False]])
    first = statistics.bootstrap_auc(per_example, labels, n_boot=50, seed=3)
    assert first.estimate == pytest.approx(metrics.roc_auc(per_example.mean(dim=0), labels))
    again = statistics.bootstrap_auc(per_example, labels, n_boot=50, seed=3)
    assert np.array_equal(first.samples, again.samples)
    assert not np.array_equal(first.samples, statistics.bootstrap_auc(per_example, labels, n_boot=50,
                                                                      seed=4).samples)
    assert first.low <= first.estimate <= first.high and first.level == 0.9 and len(first.samples) == 50
    # each resample is the statistic of the mean over the resampled prompts, repeats counted
    draws = statistics.resample_indices(30, 50, seed=3)
    assert first.samples[7] == pytest.approx(metrics.roc_auc(per_example[draws[7]].mean(dim=0), labels))


def test_a_recomputing_callable_and_a_fixed_table_enter_as_sources():
    per_example = np.random.default_rng(2).standard_normal((20, 1, 6))
    fixed = np.arange(6.0)[None]
    as_tensor = statistics.bootstrap_spearman(per_example, fixed, n_boot=40, seed=1)
    recomputed = statistics.bootstrap_spearman(lambda rows: per_example[rows].mean(axis=0), fixed,
                                               n_boot=40, seed=1, n_examples=20)
    assert as_tensor.estimate == pytest.approx(metrics.spearman(per_example.mean(axis=0), fixed))
    assert np.allclose(as_tensor.samples, recomputed.samples)
    with pytest.raises(InputError, match="n_examples"):
        statistics.bootstrap_spearman(lambda rows: per_example[rows].mean(axis=0), fixed, n_boot=5)
    with pytest.raises(InputError, match="different numbers of examples"):
        statistics.bootstrap_spearman(per_example, per_example[:10], n_boot=5)


def test_head_scores_bring_their_per_example_scores_or_are_refused_by_name():
    per_example = torch.randn(12, 2, 3, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(2, 3, dtype=torch.bool)
    labels[0, 0] = True
    item = HeadScores(per_example.mean(dim=0), "ablation_zero", details={"per_example": per_example})
    assert statistics.bootstrap_auc(item, labels, n_boot=20).estimate == pytest.approx(
        metrics.roc_auc(item, labels))
    with pytest.raises(InputError, match="hisp: its HeadScores hold no"):
        statistics.bootstrap_auc(HeadScores(per_example.mean(dim=0), "hisp"), labels, n_boot=20)
    wrong = HeadScores(per_example.mean(dim=0) + 1, "attribution_patching",
                       details={"per_example": per_example})
    with pytest.raises(InputError, match="does not average"):
        statistics.bootstrap_auc(wrong, labels, n_boot=20)


def test_row_wise_rank_statistics_match_the_single_table_ones():
    rows = np.array([[1.0, 2.0, 2.0, 5.0, 0.0], [3.0, 3.0, 3.0, 1.0, 1.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    labels = np.array([True, False, True, False, False])
    assert np.array_equal(metrics.rank_rows(rows)[1], [4.0, 4.0, 4.0, 1.5, 1.5])
    for row in rows:
        assert metrics.average_ranks(row).tolist() == metrics.rank_rows(row[None])[0].tolist()
    assert metrics.roc_auc_rows(rows, labels) == pytest.approx([metrics.roc_auc(r, labels) for r in rows])
    flat = np.ones((1, 5))
    assert np.isnan(metrics.spearman_rows(flat, rows[:1]))[0]
    assert metrics.spearman_rows(rows, rows[::-1]) == pytest.approx(
        [metrics.spearman(a, b) for a, b in zip(rows, rows[::-1], strict=True)])


def test_benchmark_auc_interval_comes_from_resampled_prompts_and_only_where_rows_exist():
    # Rejects: an interval read off a single table (zero width however noisy the prompts), one that does
    # not contain its own estimate, and an interval invented for a method without per-example rows.
    from chg_tlens.analysis.compare import auc_interval

    generator = torch.Generator().manual_seed(3)
    labels = torch.zeros(2, 4, dtype=torch.bool)
    labels[0, :2] = True
    noisy = labels.float() * 0.3 + torch.randn(40, 2, 4, generator=generator)
    interval = auc_interval(HeadScores(noisy.mean(dim=0), "hisp_raw", details={"per_example": noisy}),
                            labels.numpy(), n_boot=200)
    estimate = statistics.bootstrap_auc(noisy, labels, n_boot=10).estimate
    assert interval["auc_low"] < estimate < interval["auc_high"]
    steady = labels.float()[None].repeat(40, 1, 1)
    flat = auc_interval(HeadScores(steady.mean(dim=0), "hisp_raw", details={"per_example": steady}),
                        labels.numpy(), n_boot=50)
    assert flat["auc_low"] == flat["auc_high"] == 1.0
    assert auc_interval(HeadScores(noisy.mean(dim=0), "chg_max"), labels.numpy()) == {
        "auc_low": None, "auc_high": None}
