"""Tests for pipeline.metrics.math against plain references (scipy / numpy / loops).

The references here are written the obvious, slow way on purpose: scipy.linalg.sqrtm for the
classic FID formula, Python loops for the KID kernel sums, full numpy distance matrices for the
k-NN metrics. On a machine with CUDA the device-parametrised tests run on both CPU and CUDA.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from pipeline.metrics.math import (
    GaussianStats,
    MetricInputError,
    _weighted_moments,
    bootstrap_ci,
    density_coverage,
    fid_with_ci,
    frechet_distance,
    gaussian_stats,
    inception_score,
    kid,
    nearest_distances,
    precision_recall,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------


def _fid_scipy(x: np.ndarray, y: np.ndarray) -> float:
    """The classic formula (Heusel et al.'s reference code), all numpy float64."""
    mu1, mu2 = x.mean(axis=0), y.mean(axis=0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1.dot(s2))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def _feature_pair(kind: str, n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    if kind == "iid":
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        y = 1.3 * torch.randn(n, d, generator=g, dtype=torch.float64) + 0.2
    elif kind == "correlated":
        # Full-rank but badly conditioned: a random mixing with singular values over 3 decades.
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        scales = torch.logspace(0, -3, d, dtype=torch.float64)
        x = torch.randn(n, d, generator=g, dtype=torch.float64) @ (q * scales) @ q.T
        y = torch.randn(n, d, generator=g, dtype=torch.float64) @ (q * scales.flip(0)) @ q.T + 0.05
    elif kind == "low_rank":
        # Rank 10 features in D dimensions: covariances singular, as with saturated features.
        w = torch.randn(10, d, generator=g, dtype=torch.float64)
        x = torch.randn(n, 10, generator=g, dtype=torch.float64) @ w
        y = (torch.randn(n, 10, generator=g, dtype=torch.float64) * 1.5) @ w + 0.1
    else:
        raise AssertionError(kind)
    return x, y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("kind", "n", "d"),
    [
        ("iid", 500, 64),
        ("iid", 2000, 128),
        ("iid", 40, 64),  # N < D: both covariances singular
        ("correlated", 1000, 64),
        ("low_rank", 800, 64),
    ],
)
def test_fid_matches_scipy_reference(kind: str, n: int, d: int, device: str) -> None:
    x, y = _feature_pair(kind, n, d, seed=n + d)
    expected = _fid_scipy(x.numpy(), y.numpy())
    # float32 input: the module must upcast; the reference sees the same float32-rounded values.
    x32, y32 = x.float(), y.float()
    expected32 = _fid_scipy(x32.double().numpy(), y32.double().numpy())
    got = frechet_distance(gaussian_stats(x.to(device)), gaussian_stats(y.to(device)))
    got32 = frechet_distance(gaussian_stats(x32.to(device)), gaussian_stats(y32.to(device)))
    assert got == pytest.approx(expected, rel=1e-6)
    assert got32 == pytest.approx(expected32, rel=1e-6)


def test_gaussian_stats_match_numpy() -> None:
    x = torch.randn(300, 7, generator=_gen(1)) * 3 + 5  # float32 in
    st = gaussian_stats(x)
    assert st.mu.dtype == torch.float64 and st.sigma.dtype == torch.float64 and st.n == 300
    xn = x.double().numpy()
    np.testing.assert_allclose(st.mu.numpy(), xn.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(st.sigma.numpy(), np.cov(xn, rowvar=False), rtol=1e-10, atol=1e-12)


def test_gaussian_stats_chunked_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.metrics.math as m

    x = torch.randn(100, 5, generator=_gen(2), dtype=torch.float64)
    whole = gaussian_stats(x)
    monkeypatch.setattr(m, "_MOMENT_CHUNK", 7)  # 100 rows in 15 chunks
    chunked = gaussian_stats(x)
    torch.testing.assert_close(chunked.mu, whole.mu, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(chunked.sigma, whole.sigma, rtol=1e-12, atol=1e-14)


def test_fid_same_features_is_zero_and_symmetric() -> None:
    x, y = _feature_pair("iid", 1000, 64, seed=3)
    sx, sy = gaussian_stats(x), gaussian_stats(y)
    assert abs(frechet_distance(sx, sx)) < 1e-6
    lr, _ = _feature_pair("low_rank", 500, 64, seed=4)
    s_lr = gaussian_stats(lr)
    assert abs(frechet_distance(s_lr, s_lr)) < 1e-6
    assert frechet_distance(sx, sy) == pytest.approx(frechet_distance(sy, sx), rel=1e-9)
    assert frechet_distance(sx, sy) > 1.0


def test_fid_grows_with_mean_shift_and_noise() -> None:
    g = _gen(5)
    real = torch.randn(2000, 32, generator=g, dtype=torch.float64)
    fake = torch.randn(2000, 32, generator=g, dtype=torch.float64)
    sr = gaussian_stats(real)
    shifts = [0.0, 0.05, 0.1, 0.3, 1.0, 3.0]
    by_shift = [frechet_distance(sr, gaussian_stats(fake + s)) for s in shifts]
    assert all(a < b for a, b in zip(by_shift, by_shift[1:])), by_shift
    # Added noise of growing scale (the same noise draw, scaled): FID grows with the scale.
    noise = torch.randn(2000, 32, generator=g, dtype=torch.float64)
    scales = [0.0, 0.1, 0.3, 1.0, 3.0]
    by_noise = [frechet_distance(sr, gaussian_stats(real + s * noise)) for s in scales]
    assert by_noise[0] == pytest.approx(0.0, abs=1e-6)
    assert all(a < b for a, b in zip(by_noise, by_noise[1:])), by_noise


def test_fid_rejects_bad_input() -> None:
    with pytest.raises(MetricInputError, match="dimension"):
        frechet_distance(gaussian_stats(torch.randn(10, 3)), gaussian_stats(torch.randn(10, 4)))
    with pytest.raises(MetricInputError, match="NaN"):
        gaussian_stats(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(MetricInputError, match="at least 2 rows"):
        gaussian_stats(torch.randn(1, 3))
    with pytest.raises(MetricInputError):
        GaussianStats(mu=torch.zeros(3), sigma=torch.zeros(2, 2), n=5)


# --------------------------------------------------------------------------------------------
# KID
# --------------------------------------------------------------------------------------------


def _mmd2_naive(x: list[list[float]], y: list[list[float]]) -> float:
    """Unbiased MMD² with k(a, b) = (a.b / D + 1)^3, written as plain loops."""
    m, d = len(x), len(x[0])

    def k(a: list[float], b: list[float]) -> float:
        return (sum(ai * bi for ai, bi in zip(a, b)) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2.0 * xy


@pytest.mark.parametrize("device", DEVICES)
def test_kid_matches_naive_on_whole_sets(device: str) -> None:
    g = _gen(6)
    real = torch.randn(12, 5, generator=g)
    fake = torch.randn(12, 5, generator=g) + 0.4
    # subset_size == N: every subset is the whole set (order does not change MMD²).
    mean, std, info = kid(real.to(device), fake.to(device), subset_size=12, n_subsets=3)
    expected = _mmd2_naive(real.double().tolist(), fake.double().tolist())
    assert mean == pytest.approx(expected, rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)
    assert info["subset_size"] == 12


def test_kid_matches_naive_on_documented_subsets() -> None:
    g = _gen(7)
    real = torch.randn(20, 4, generator=g, dtype=torch.float64)
    fake = torch.randn(15, 4, generator=g, dtype=torch.float64) * 1.5
    m, n_subsets, seed = 6, 4, 11
    mean, std, _ = kid(real, fake, subset_size=m, n_subsets=n_subsets, seed=seed)
    # The subset draw documented in kid(): one CPU generator, randperm(Nr)[:m] then randperm(Nf)[:m].
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(n_subsets):
        ir = torch.randperm(20, generator=gen)[:m]
        jf = torch.randperm(15, generator=gen)[:m]
        values.append(_mmd2_naive(real[ir].tolist(), fake[jf].tolist()))
    assert mean == pytest.approx(float(np.mean(values)), rel=1e-10)
    assert std == pytest.approx(float(np.std(values)), rel=1e-8)


def test_kid_batches_of_subsets_equal_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.metrics.math as mm

    g = _gen(8)
    real, fake = torch.randn(40, 6, generator=g), torch.randn(40, 6, generator=g) + 0.3
    monkeypatch.setattr(mm, "_KID_FULL_KERNEL_MAX_ROWS", 0)  # the per-subset path for any size
    whole = kid(real, fake, subset_size=10, n_subsets=9)
    monkeypatch.setattr(mm, "_KID_BATCH_ELEMENTS", 200)  # 2 subsets of 10x10 per batch
    batched = kid(real, fake, subset_size=10, n_subsets=9)
    assert batched[0] == pytest.approx(whole[0], rel=1e-12)
    assert batched[1] == pytest.approx(whole[1], rel=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_kid_full_kernel_path_equals_subset_path(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.metrics.math as mm

    g = _gen(18)
    real = torch.randn(70, 6, generator=g).to(device)
    fake = (torch.randn(90, 6, generator=g) * 1.3 + 0.2).to(device)
    full = kid(real, fake, subset_size=25, n_subsets=7, seed=3)  # 160 rows: whole-kernel path
    monkeypatch.setattr(mm, "_KID_FULL_KERNEL_MAX_ROWS", 0)
    per_subset = kid(real, fake, subset_size=25, n_subsets=7, seed=3)
    assert full[0] == pytest.approx(per_subset[0], rel=1e-10)
    assert full[1] == pytest.approx(per_subset[1], rel=1e-8)
    assert full[0] != 0.0


def test_kid_same_distribution_near_zero_shifted_positive() -> None:
    g = _gen(9)
    real = torch.randn(600, 16, generator=g)
    same = torch.randn(600, 16, generator=g)
    shifted = torch.randn(600, 16, generator=g) + 0.5
    far = torch.randn(600, 16, generator=g) + 1.0
    m_same, s_same, _ = kid(real, same, n_subsets=20)
    m_shift, _, _ = kid(real, shifted, n_subsets=20)
    m_far, _, _ = kid(real, far, n_subsets=20)
    assert m_shift > 0 and m_far > m_shift
    assert abs(m_same) < 0.02 * m_shift
    assert s_same < 0.1 * m_shift
    # Seeded: the same call gives the same numbers.
    assert kid(real, shifted, n_subsets=20) == kid(real, shifted, n_subsets=20)


def test_kid_subset_size_default_and_warning() -> None:
    g = _gen(10)
    _, _, info = kid(torch.randn(300, 4, generator=g), torch.randn(250, 4, generator=g), n_subsets=2)
    assert info["subset_size"] == 250 and "warning" not in info
    _, _, info = kid(torch.randn(1200, 4, generator=g), torch.randn(1100, 4, generator=g), n_subsets=1)
    assert info["subset_size"] == 1000 and "warning" not in info
    _, _, info = kid(torch.randn(80, 4, generator=g), torch.randn(500, 4, generator=g), n_subsets=2)
    assert info["subset_size"] == 80
    assert "warning" in info and "80" in info["warning"]
    _, _, info = kid(torch.randn(500, 4, generator=g), torch.randn(500, 4, generator=g), subset_size=50, n_subsets=2)
    assert "warning" in info
    with pytest.raises(MetricInputError, match="subset_size"):
        kid(torch.randn(30, 4), torch.randn(20, 4), subset_size=25)
    with pytest.raises(MetricInputError, match="dimension"):
        kid(torch.randn(30, 4), torch.randn(30, 5))


# --------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------


def _is_reference(probs: np.ndarray, splits: int) -> tuple[float, float]:
    """Salimans et al.'s reference code, transcribed (numpy float64)."""
    scores = []
    n = probs.shape[0]
    for i in range(splits):
        part = probs[(i * n // splits) : ((i + 1) * n // splits), :]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        kl = np.mean(np.sum(kl, 1))
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


@pytest.mark.parametrize(("k", "n"), [(10, 1000), (3, 300)])
def test_is_perfect_balanced_set_is_k(k: int, n: int) -> None:
    probs = torch.nn.functional.one_hot(torch.arange(n) % k, k).float()  # every split balanced
    mean, std = inception_score(probs, splits=10)
    assert abs(mean - k) < 1e-6
    assert std < 1e-9


def test_is_identical_predictions_is_one() -> None:
    uniform = torch.full((200, 10), 0.1)
    assert inception_score(uniform)[0] == pytest.approx(1.0, abs=1e-9)
    constant = torch.nn.functional.one_hot(torch.full((200,), 3), 10).float()
    assert inception_score(constant)[0] == pytest.approx(1.0, abs=1e-9)
    soft = torch.softmax(torch.randn(10, generator=_gen(11)), 0).expand(200, 10)
    assert inception_score(soft)[0] == pytest.approx(1.0, abs=1e-9)


def test_is_mixture_between_and_matches_reference() -> None:
    k = 10
    sharp = torch.nn.functional.one_hot(torch.arange(500) % k, k).double()
    uniform = torch.full((500, k), 1.0 / k, dtype=torch.float64)
    mixed = torch.stack([sharp, uniform], dim=1).reshape(1000, k)  # interleaved rows
    mean, _ = inception_score(mixed)
    assert 1.5 < mean < k - 1.5
    logits = torch.randn(1000, k, generator=_gen(12), dtype=torch.float64) * 3
    probs = torch.softmax(logits, dim=1)
    ref_mean, ref_std = _is_reference(probs.numpy(), 10)
    mean, std = inception_score(probs, splits=10)
    assert mean == pytest.approx(ref_mean, rel=1e-10)
    assert std == pytest.approx(ref_std, rel=1e-8)
    # Uneven split sizes (997 rows, 7 splits) follow the reference code's boundaries.
    p = probs[:997]
    assert inception_score(p, splits=7)[0] == pytest.approx(_is_reference(p.numpy(), 7)[0], rel=1e-10)


def test_is_rejects_logits() -> None:
    with pytest.raises(MetricInputError, match="logits"):
        inception_score(torch.randn(50, 10))
    with pytest.raises(MetricInputError, match="sum to 1"):
        inception_score(torch.rand(50, 10) + 0.1)
    with pytest.raises(MetricInputError, match="splits"):
        inception_score(torch.full((5, 2), 0.5), splits=10)


# --------------------------------------------------------------------------------------------
# Nearest neighbours, precision/recall, density/coverage
# --------------------------------------------------------------------------------------------


def _dist_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Full Euclidean distance matrix by explicit differences (no |a|^2 + |b|^2 - 2ab trick)."""
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1))


def _kth_radius_np(x: np.ndarray, k: int) -> np.ndarray:
    d = _dist_np(x, x)
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, k - 1]


def _prdc_np(real: np.ndarray, fake: np.ndarray, k_pr: int, k_dc: int) -> tuple[float, ...]:
    d_rf = _dist_np(real, fake)  # [Nr, Nf]
    r_pr, f_pr = _kth_radius_np(real, k_pr), _kth_radius_np(fake, k_pr)
    precision = float(np.mean([(d_rf[:, j] <= r_pr).any() for j in range(fake.shape[0])]))
    recall = float(np.mean([(d_rf[i, :] <= f_pr).any() for i in range(real.shape[0])]))
    r_dc = _kth_radius_np(real, k_dc)
    density = float((d_rf < r_dc[:, None]).sum() / (k_dc * fake.shape[0]))
    coverage = float(np.mean(d_rf.min(axis=1) < r_dc))
    return precision, recall, density, coverage


@pytest.mark.parametrize("device", DEVICES)
def test_nearest_distances_brute_force(device: str) -> None:
    g = _gen(13)
    q = torch.randn(50, 6, generator=g)
    r = torch.randn(41, 6, generator=g)
    d, i = nearest_distances(q.to(device), r.to(device), batch=7)
    full = _dist_np(q.double().numpy(), r.double().numpy())
    np.testing.assert_array_equal(i.cpu().numpy(), full.argmin(axis=1))
    np.testing.assert_allclose(d.cpu().numpy(), full.min(axis=1), rtol=1e-9)
    # Same set, own row excluded (query row i is reference row i).
    d, i = nearest_distances(q.to(device), q.to(device), exclude_self=True, batch=7)
    full = _dist_np(q.double().numpy(), q.double().numpy())
    np.fill_diagonal(full, np.inf)
    np.testing.assert_array_equal(i.cpu().numpy(), full.argmin(axis=1))
    np.testing.assert_allclose(d.cpu().numpy(), full.min(axis=1), rtol=1e-9)
    assert (i.cpu() != torch.arange(50)).all()
    # Without exclusion a set's nearest neighbour is itself at ~0.
    d, i = nearest_distances(q.to(device), q.to(device), batch=7)
    assert (i.cpu() == torch.arange(50)).all() and float(d.max()) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [7, 4096])
def test_prdc_match_brute_force(device: str, batch: int) -> None:
    g = _gen(14)
    real = torch.randn(60, 4, generator=g)
    fake = torch.randn(45, 4, generator=g) * 1.3 + 0.4
    p, r = precision_recall(real.to(device), fake.to(device), k=3, batch=batch)
    dens, cov = density_coverage(real.to(device), fake.to(device), k=5, batch=batch)
    ref = _prdc_np(real.double().numpy(), fake.double().numpy(), 3, 5)
    assert (p, r, dens, cov) == ref
    assert 0 < p < 1 and 0 < r < 1 and 0 < cov < 1  # the data is such that every branch counts


def test_prdc_identical_and_disjoint() -> None:
    g = _gen(15)
    real = torch.randn(400, 8, generator=g)
    p, r = precision_recall(real, real.clone())
    dens, cov = density_coverage(real, real.clone())
    assert p == 1.0 and r == 1.0 and cov == 1.0
    assert 0.8 < dens < 1.2
    far = real + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    assert density_coverage(real, far) == (0.0, 0.0)


def test_prdc_detect_mode_dropping() -> None:
    g = _gen(16)
    centres = torch.randn(10, 8, generator=g) * 10  # 10 well separated modes

    def sample(modes: torch.Tensor, n: int) -> torch.Tensor:
        pick = modes[torch.randint(0, len(modes), (n,), generator=g)]
        return centres[pick] + torch.randn(n, 8, generator=g)

    real = sample(torch.arange(10), 1000)
    full = sample(torch.arange(10), 1000)
    dropped = sample(torch.arange(5), 1000)  # all mass on half of the modes
    p_full, r_full = precision_recall(real, full)
    d_full, c_full = density_coverage(real, full)
    p_drop, r_drop = precision_recall(real, dropped)
    d_drop, c_drop = density_coverage(real, dropped)
    assert p_full > 0.85 and r_full > 0.85 and c_full > 0.85
    assert p_drop > 0.85  # what it makes is realistic ...
    assert r_drop < 0.6 and c_drop < 0.6  # ... but half of the real modes are missed
    assert r_full - r_drop > 0.3 and c_full - c_drop > 0.3


def test_prdc_rejects_bad_k() -> None:
    with pytest.raises(MetricInputError, match="k must be"):
        precision_recall(torch.randn(3, 2), torch.randn(10, 2), k=3)
    with pytest.raises(MetricInputError, match="k must be"):
        density_coverage(torch.randn(10, 2), torch.randn(10, 2), k=0)


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------


def test_bootstrap_ci_of_a_mean_matches_normal_theory() -> None:
    data = torch.randn(400, generator=_gen(17), dtype=torch.float64) * 2 + 1
    lo, hi = bootstrap_ci(lambda idx: float(data[idx].mean()), 400, n_boot=400, seed=3)
    mean = float(data.mean())
    half_width = 1.96 * float(data.std()) / math.sqrt(400)
    assert lo < mean < hi
    assert (hi - lo) / 2 == pytest.approx(half_width, rel=0.2)
    assert bootstrap_ci(lambda idx: float(data[idx].mean()), 400, seed=3, n_boot=50) == bootstrap_ci(
        lambda idx: float(data[idx].mean()), 400, seed=3, n_boot=50
    )


def test_weighted_moments_equal_gathered_resample() -> None:
    # fid_with_ci summarises a resample by row counts instead of copying rows: check they agree.
    x = torch.randn(30, 4, generator=_gen(18), dtype=torch.float64)
    idx = torch.randint(0, 30, (30,), generator=_gen(19))
    mu_w, sigma_w = _weighted_moments(x, torch.bincount(idx, minlength=30))
    gathered = gaussian_stats(x[idx])
    torch.testing.assert_close(mu_w, gathered.mu, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(sigma_w, gathered.sigma, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("device", DEVICES)
def test_fid_with_ci_contains_value_and_narrows_with_n(device: str) -> None:
    g = _gen(20)
    real_stats = gaussian_stats(torch.randn(5000, 16, generator=g, dtype=torch.float64).to(device))
    widths = {}
    for n in (200, 2000):
        fake = (torch.randn(n, 16, generator=g) * 1.2 + 0.3).to(device)
        res = fid_with_ci(real_stats, fake, n_boot=20, seed=0)
        assert set(res) >= {"value", "ci_low", "ci_high", "n_boot"} and res["n_boot"] == 20
        assert res["value"] == pytest.approx(frechet_distance(real_stats, gaussian_stats(fake)), rel=1e-12)
        assert res["ci_low"] <= res["value"] <= res["ci_high"]
        widths[n] = res["ci_high"] - res["ci_low"]
    assert widths[2000] < 0.5 * widths[200], widths


def test_prdc_ball_boundary_conventions() -> None:
    # Integer points on a line: every distance is exact, so points lie exactly on ball surfaces.
    real = torch.arange(10, dtype=torch.float64)[:, None]  # radius (k=1) of every point: 1
    fake = torch.tensor([[-1.0], [4.5]], dtype=torch.float64)  # -1 is exactly on 0's ball
    assert precision_recall(real, fake, k=1)[0] == 1.0  # Kynkäänniemi: distance <= radius
    dens, cov = density_coverage(real, fake, k=1)  # Naeem: distance < radius
    assert dens == pytest.approx(2 / 2)  # 4.5 lies inside the balls of 4 and 5; -1 in none
    assert cov == pytest.approx(2 / 10)
