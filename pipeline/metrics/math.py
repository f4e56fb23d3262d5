"""Metric math on feature tensors: FID, KID, IS, precision/recall, density/coverage, bootstrap CIs.

Pure functions on tensors that a feature network already produced (``[N, D]`` features or
``[N, K]`` class probabilities). No files, no models, no tracker: the evaluate stage extracts the
features and this module turns them into numbers. Every function works on CPU and CUDA tensors
alike and keeps the work on the device its inputs are on; statistics are computed in float64
whatever the input dtype, because FID's trace term cancels large numbers against each other.

References
----------
- FID: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
  Nash Equilibrium" -- the Fréchet distance between Gaussians fitted to the two feature sets.
- KID: Bińkowski et al. 2018, "Demystifying MMD GANs" -- the unbiased MMD² estimate with the cubic
  polynomial kernel, averaged over random subsets.
- IS: Salimans et al. 2016, "Improved Techniques for Training GANs" -- exp(E_x KL(p(y|x) || p(y))),
  mean and std over splits.
- Precision/recall: Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
  Generative Models" -- k-NN balls around each sample approximate the two manifolds.
- Density/coverage: Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative
  Models".

Conventions (chosen to match the papers' reference code, so numbers are comparable):

- Covariances are unbiased (divide by N - 1), as in the reference FID code (``np.cov``).
- KID and IS report the population std (``np.std``, ddof=0) over subsets / splits, as the
  reference implementations and torch-fidelity do.
- Precision/recall count a point as inside a k-NN ball when ``distance <= radius`` (the
  StyleGAN/Kynkäänniemi code); density/coverage use ``distance < radius`` (Naeem et al.'s code).
- A real point's k-NN radius is the distance to its k-th nearest *other* real point.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import UserError

__all__ = [
    "GaussianStats",
    "MetricInputError",
    "bootstrap_ci",
    "density_coverage",
    "draw_interval",
    "fid_with_ci",
    "frechet_distance",
    "gaussian_stats",
    "inception_score",
    "kid",
    "nearest_distances",
    "precision_recall",
    "student_t_quantile",
]

# Rows per chunk when accumulating moments, so a [50k, 2048] feature matrix is never copied to
# float64 as a whole (only [_MOMENT_CHUNK, D] at a time).
_MOMENT_CHUNK = 8192
# Upper bound on the float64 elements of one batch of KID kernel matrices ([S, m, m] each):
# 2**24 elements = 128 MiB per matrix, i.e. 16 subsets of the default size 1000 at once.
_KID_BATCH_ELEMENTS = 1 << 24
# KID with Nr + Nf up to this many rows forms the three whole kernel matrices once (float64,
# (Nr + Nf)^2 elements: 128 MiB at the limit) and sums each subset's entries through 0/1
# indicator vectors -- 50 subsets of 1000 from 1000 + 2000 rows in ~0.5 s instead of ~8 s of
# per-subset matmuls on two CPU cores. Larger sets use the per-subset batches.
_KID_FULL_KERNEL_MAX_ROWS = 4096
# Below this subset size the KID estimate is noisy enough to say so.
_KID_MIN_RELIABLE_SUBSET = 100
_KID_DEFAULT_SUBSET = 1000
# Probabilities are clamped at this value before taking logs (0 * log 0 is then 0, not NaN).
_IS_EPS = 1e-12


class MetricInputError(UserError, ValueError):
    """Features or probabilities that a metric cannot be computed from (shape, size, values)."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors field-wise has no single truth value
class GaussianStats:
    """Mean and unbiased covariance of a feature set (float64), and how many samples made them."""

    mu: torch.Tensor  # [D] float64
    sigma: torch.Tensor  # [D, D] float64
    n: int

    def __post_init__(self) -> None:
        if self.mu.ndim != 1 or self.sigma.shape != (self.mu.shape[0], self.mu.shape[0]):
            raise MetricInputError(
                f"GaussianStats needs mu [D] and sigma [D, D]; got mu {tuple(self.mu.shape)} "
                f"and sigma {tuple(self.sigma.shape)}"
            )

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @functools.cached_property
    def sqrt_factor(self) -> torch.Tensor:
        """L [D, r] of :func:`_psd_sqrt_factor`, computed once per statistics object.

        FID against one reference for several generated sets (sample draws, bootstrap, the
        extractor's real-vs-real floor) then costs one eigendecomposition of the reference
        covariance, not one per comparison ([2048, 2048] float64: ~1 s on one CPU core).
        cached_property writes the instance __dict__, which a frozen dataclass allows.
        """
        return _psd_sqrt_factor(self.sigma.to(torch.float64))

    def to(self, device: torch.device | str) -> GaussianStats:
        """The same statistics on ``device`` (float64 kept)."""
        return GaussianStats(
            mu=self.mu.to(device=device, dtype=torch.float64),
            sigma=self.sigma.to(device=device, dtype=torch.float64),
            n=self.n,
        )


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _check_matrix(x: torch.Tensor, name: str, *, min_rows: int = 1) -> None:
    """Raise MetricInputError unless ``x`` is a finite real [N, D] tensor with N >= min_rows."""
    if not isinstance(x, torch.Tensor):
        raise MetricInputError(f"{name} must be a torch.Tensor of shape [N, D]; got {type(x).__name__}")
    if x.ndim != 2:
        raise MetricInputError(f"{name} must have shape [N, D]; got {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise MetricInputError(f"{name} must be a real tensor; got dtype {x.dtype}")
    if x.shape[0] < min_rows:
        raise MetricInputError(f"{name} needs at least {min_rows} rows; got {x.shape[0]}")
    if x.shape[1] < 1:
        raise MetricInputError(f"{name} has no feature columns (shape {tuple(x.shape)})")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise MetricInputError(f"{name} contains NaN or Inf values")


def _check_pair(real: torch.Tensor, fake: torch.Tensor, *, min_rows: int = 1) -> None:
    _check_matrix(real, "real", min_rows=min_rows)
    _check_matrix(fake, "fake", min_rows=min_rows)
    if real.shape[1] != fake.shape[1]:
        raise MetricInputError(
            f"real and fake features differ in dimension: {real.shape[1]} vs {fake.shape[1]}"
        )
    if real.device != fake.device:
        raise MetricInputError(f"real and fake are on different devices: {real.device} vs {fake.device}")


# --------------------------------------------------------------------------------------------
# Gaussian statistics and the Fréchet distance (FID)
# --------------------------------------------------------------------------------------------


def _weighted_moments(
    features: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and unbiased covariance [D, D] (float64) of ``features`` [N, D].

    ``weights`` [N] (integer counts summing to N, or None for all ones) lets a bootstrap
    resample -- which repeats some rows and drops others -- be summarised without gathering a
    copy of the rows: row i counted ``weights[i]`` times gives exactly the resample's moments.
    Two passes over row chunks (mean, then centred scatter) keep float64 memory at
    [_MOMENT_CHUNK, D] and avoid the cancellation of the one-pass E[xx^T] - mu mu^T form.
    """
    n, d = features.shape
    dev = features.device
    total = float(n) if weights is None else float(weights.sum().item())
    mu = torch.zeros(d, dtype=torch.float64, device=dev)  # [D]
    for start in range(0, n, _MOMENT_CHUNK):
        x = features[start : start + _MOMENT_CHUNK].to(torch.float64)  # [c, D]
        if weights is None:
            mu += x.sum(dim=0)
        else:
            mu += weights[start : start + _MOMENT_CHUNK].to(torch.float64) @ x
    mu /= total
    scatter = torch.zeros(d, d, dtype=torch.float64, device=dev)  # [D, D]
    for start in range(0, n, _MOMENT_CHUNK):
        xc = features[start : start + _MOMENT_CHUNK].to(torch.float64) - mu  # [c, D]
        if weights is None:
            scatter += xc.T @ xc
        else:
            w = weights[start : start + _MOMENT_CHUNK].to(torch.float64)  # [c]
            scatter += xc.T @ (w[:, None] * xc)
    sigma = scatter / (total - 1.0)
    sigma = 0.5 * (sigma + sigma.T)  # exact symmetry for eigh
    return mu, sigma


def gaussian_stats(features: torch.Tensor) -> GaussianStats:
    """Mean and unbiased (N - 1) covariance of ``features`` [N, D], in float64 on its device."""
    _check_matrix(features, "features", min_rows=2)
    mu, sigma = _weighted_moments(features)
    return GaussianStats(mu=mu, sigma=sigma, n=int(features.shape[0]))


def _psd_sqrt_factor(sigma: torch.Tensor) -> torch.Tensor:
    """L [D, r] with sqrt(Sigma) = L V_r^T, Sigma = L L^T, from a symmetric eigh of Sigma [D, D].

    L = V_r diag(sqrt(w_r)) keeps the r eigenpairs with w > max(w) * D * eps (numpy's
    ``matrix_rank`` tolerance). Eigenvalues below that are rounding noise of a covariance
    (negative ones included; a covariance is PSD) and are set to 0 -- dropping them rather than
    keeping sqrt(noise) matters for rank-deficient covariances (N <= D, saturated features):
    sqrt(1e-13) per null direction would otherwise add up to an error of ~1e-5 in FID(x, x).
    """
    evals, evecs = torch.linalg.eigh(sigma)  # [D] ascending, [D, D]
    tol = evals.abs().max() * sigma.shape[0] * torch.finfo(torch.float64).eps
    keep = evals > tol
    return evecs[:, keep] * evals[keep].sqrt()  # [D, r]


def _frechet_with_factor(
    mu_a: torch.Tensor,
    factor_a: torch.Tensor,
    trace_a: float,
    mu_b: torch.Tensor,
    sigma_b: torch.Tensor,
) -> float:
    """Fréchet distance given L_a = _psd_sqrt_factor(Sa) [D, r] (lets a bootstrap reuse it).

    tr((Sa Sb)^{1/2}) is the sum of square roots of the eigenvalues of Sa Sb. Sa Sb is similar to
    the symmetric PSD matrix sqrt(Sa) Sb sqrt(Sa), and with sqrt(Sa) = V_r diag(sqrt w) V_r^T the
    non-zero eigenvalues of that matrix are those of C = L_a^T Sb L_a [r, r] (AB and BA share
    non-zero eigenvalues). C is symmetric PSD, so one eigvalsh gives real eigenvalues (tiny
    negative ones from rounding are clamped to 0) on any device -- unlike scipy.linalg.sqrtm on
    the non-symmetric Sa Sb, which is slow on CPU, absent on GPU and prone to complex round-off.
    """
    diff = mu_a - mu_b  # [D]
    c = factor_a.T @ sigma_b @ factor_a  # [r, r]
    c = 0.5 * (c + c.T)
    trace_sqrt = torch.linalg.eigvalsh(c).clamp(min=0.0).sqrt().sum()
    fd = diff.dot(diff) + trace_a + torch.trace(sigma_b) - 2.0 * trace_sqrt
    return float(fd.item())


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """Fréchet distance |mu_a - mu_b|^2 + tr(Sa) + tr(Sb) - 2 tr((Sa Sb)^{1/2}) (Heusel et al. 2017).

    Computed in float64 on ``a``'s device (``b`` is moved there if it lives elsewhere, so cached
    CPU reference statistics can be compared with GPU ones). See :func:`_frechet_with_factor`
    for how the trace term avoids a general matrix square root. Tiny negative results from
    rounding (identical inputs) are returned as they are, not clamped, so bugs stay visible.
    """
    if a.dim != b.dim:
        raise MetricInputError(f"statistics differ in dimension: {a.dim} vs {b.dim}")
    dev = a.mu.device
    mu_a, sigma_a = a.mu.to(dev, torch.float64), a.sigma.to(dev, torch.float64)
    mu_b, sigma_b = b.mu.to(dev, torch.float64), b.sigma.to(dev, torch.float64)
    return _frechet_with_factor(mu_a, a.sqrt_factor.to(dev), float(torch.trace(sigma_a).item()), mu_b, sigma_b)


# --------------------------------------------------------------------------------------------
# KID
# --------------------------------------------------------------------------------------------


def _kid_subset_mmd2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD² per subset for x, y [S, m, D] float64 -> [S].

    Kernel k(a, b) = (a.b / D + 1)^3. The within-set sums drop the diagonal (i == j) terms and
    divide by m(m-1); the cross term averages all m^2 pairs (Bińkowski et al.'s estimator).
    """
    s, m, d = x.shape
    k_xx = (torch.bmm(x, x.transpose(1, 2)) / d + 1.0).pow(3)  # [S, m, m]
    k_yy = (torch.bmm(y, y.transpose(1, 2)) / d + 1.0).pow(3)  # [S, m, m]
    k_xy = (torch.bmm(x, y.transpose(1, 2)) / d + 1.0).pow(3)  # [S, m, m]
    off_diag = (
        k_xx.sum(dim=(1, 2))
        - k_xx.diagonal(dim1=1, dim2=2).sum(dim=1)
        + k_yy.sum(dim=(1, 2))
        - k_yy.diagonal(dim1=1, dim2=2).sum(dim=1)
    )  # [S]
    return off_diag / (m * (m - 1)) - 2.0 * k_xy.sum(dim=(1, 2)) / (m * m)


def _kid_mmd2_from_full_kernels(
    real: torch.Tensor, fake: torch.Tensor, idx_real: torch.Tensor, idx_fake: torch.Tensor
) -> torch.Tensor:
    """The same per-subset MMD² as :func:`_kid_subset_mmd2`, from whole kernel matrices -> [S].

    real [Nr, D], fake [Nf, D], idx_* [S, m] (rows of each subset, no repeats). With 0/1
    indicators W [N, S] of the subsets, subset s's kernel sum is (W^T K W)[s, s], computed as
    ((K W) * W).sum(0): a few [N, N] x [N, S] products instead of S [m, m] kernel matrices.
    """
    s, m = idx_real.shape
    d = real.shape[1]
    x, y = real.to(torch.float64), fake.to(torch.float64)  # [Nr, D], [Nf, D]

    def indicator(idx: torch.Tensor, n: int) -> torch.Tensor:
        w = torch.zeros(n, s, dtype=torch.float64, device=idx.device)  # [N, S]
        w.scatter_(0, idx.T, 1.0)
        return w

    w_r, w_f = indicator(idx_real, x.shape[0]), indicator(idx_fake, y.shape[0])
    k_xx = (x @ x.T / d + 1.0).pow(3)  # [Nr, Nr]
    k_yy = (y @ y.T / d + 1.0).pow(3)  # [Nf, Nf]
    k_xy = (x @ y.T / d + 1.0).pow(3)  # [Nr, Nf]
    sum_xx = ((k_xx @ w_r) * w_r).sum(dim=0) - k_xx.diagonal() @ w_r  # [S], off-diagonal sums
    sum_yy = ((k_yy @ w_f) * w_f).sum(dim=0) - k_yy.diagonal() @ w_f  # [S]
    sum_xy = ((k_xy @ w_f) * w_r).sum(dim=0)  # [S]
    return (sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * sum_xy / (m * m)


def kid(
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    subset_size: int | None = None,
    n_subsets: int = 100,
    seed: int = 0,
) -> tuple[float, float, dict]:
    """Kernel Inception Distance (Bińkowski et al. 2018): (mean, std, info) over random subsets.

    real [Nr, D], fake [Nf, D]. ``subset_size`` is the rows drawn per subset from each set,
    without replacement; None means min(1000, Nr, Nf) (1000 is the usual protocol). Subsets are
    drawn from one CPU ``torch.Generator`` seeded with ``seed``: for each subset in turn,
    ``randperm(Nr)[:m]`` then ``randperm(Nf)[:m]`` -- so the result depends only on the inputs and
    the seed, not on the device. ``std`` is the population std (ddof=0) over subsets.

    ``info`` holds ``subset_size``, ``n_subsets`` and ``seed``; and ``warning`` (a sentence) when
    the subset size is below 100, where the estimate is too noisy to rank models by.
    """
    _check_pair(real, fake, min_rows=2)
    if n_subsets < 1:
        raise MetricInputError(f"n_subsets must be >= 1; got {n_subsets}")
    n_real, n_fake = int(real.shape[0]), int(fake.shape[0])
    if subset_size is None:
        m = min(_KID_DEFAULT_SUBSET, n_real, n_fake)
    else:
        m = int(subset_size)
        if m > min(n_real, n_fake):
            raise MetricInputError(
                f"KID subset_size={m} is larger than the smaller set "
                f"(real has {n_real} rows, fake {n_fake}); use subset_size <= {min(n_real, n_fake)} or None"
            )
    if m < 2:
        raise MetricInputError(f"KID needs subset_size >= 2 for the unbiased estimate; got {m}")

    info: dict = {"subset_size": m, "n_subsets": int(n_subsets), "seed": int(seed)}
    if m < _KID_MIN_RELIABLE_SUBSET:
        info["warning"] = (
            f"KID subset size {m} is below {_KID_MIN_RELIABLE_SUBSET} "
            f"(real {n_real}, fake {n_fake} samples): the estimate is noisy; use more samples"
        )

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    idx_real = torch.empty(n_subsets, m, dtype=torch.long)  # [S, m]
    idx_fake = torch.empty(n_subsets, m, dtype=torch.long)  # [S, m]
    for s in range(n_subsets):
        idx_real[s] = torch.randperm(n_real, generator=gen)[:m]
        idx_fake[s] = torch.randperm(n_fake, generator=gen)[:m]
    idx_real, idx_fake = idx_real.to(real.device), idx_fake.to(fake.device)

    if n_real + n_fake <= _KID_FULL_KERNEL_MAX_ROWS:
        mmd2 = _kid_mmd2_from_full_kernels(real, fake, idx_real, idx_fake)
        return float(mmd2.mean().item()), float(mmd2.std(correction=0).item()), info

    # Batch subsets so each [S_b, m, m] float64 kernel matrix stays under _KID_BATCH_ELEMENTS.
    per_batch = max(1, _KID_BATCH_ELEMENTS // (m * m))
    values = []
    for start in range(0, n_subsets, per_batch):
        x = real[idx_real[start : start + per_batch]].to(torch.float64)  # [S_b, m, D]
        y = fake[idx_fake[start : start + per_batch]].to(torch.float64)  # [S_b, m, D]
        values.append(_kid_subset_mmd2(x, y))
    mmd2 = torch.cat(values)  # [S]
    return float(mmd2.mean().item()), float(mmd2.std(correction=0).item()), info


# --------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------


def inception_score(probs: torch.Tensor, *, splits: int = 10) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), (mean, std) over splits.

    ``probs`` [N, K]: rows are class probabilities (softmax outputs, not logits). The rows are cut
    into ``splits`` contiguous chunks with boundaries i*N//splits (the reference code's split),
    p(y) is the chunk's mean row, and the std is the population std (ddof=0) over chunks.
    Probabilities are clamped at 1e-12 before the log so p log p is 0 at p = 0.
    """
    _check_matrix(probs, "probs", min_rows=1)
    n = int(probs.shape[0])
    if splits < 1 or splits > n:
        raise MetricInputError(f"splits must be between 1 and the number of rows ({n}); got {splits}")
    p = probs.to(torch.float64)  # [N, K]
    if bool((p < 0).any()):
        raise MetricInputError("probs has negative entries: pass softmax probabilities, not logits")
    row_sums = p.sum(dim=1)  # [N]
    worst = float((row_sums - 1.0).abs().max().item())
    if worst > 1e-3:
        raise MetricInputError(
            f"probs rows must sum to 1 (softmax outputs); the worst row is off by {worst:.3g}"
        )
    log_p = p.clamp(min=_IS_EPS).log()  # [N, K]
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        part, log_part = p[lo:hi], log_p[lo:hi]  # [n_i, K]
        p_y = part.mean(dim=0, keepdim=True)  # [1, K]
        kl = (part * (log_part - p_y.clamp(min=_IS_EPS).log())).sum(dim=1)  # [n_i]
        scores.append(kl.mean().exp())
    s = torch.stack(scores)  # [splits]
    return float(s.mean().item()), float(s.std(correction=0).item())


# --------------------------------------------------------------------------------------------
# Nearest neighbours (memory-bounded) and the k-NN manifold metrics
# --------------------------------------------------------------------------------------------


def _knn(
    query: torch.Tensor, reference: torch.Tensor, k: int, *, exclude_self: bool, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """k smallest Euclidean distances from each query row to the reference rows.

    query [Nq, D], reference [Nr, D] -> (distances [Nq, k] float64 ascending, indices [Nq, k]).
    Distances are computed block by block ([batch, batch] at most) and a running k-smallest is
    kept with topk, so Nq x Nr is never materialised. With ``exclude_self`` query row i is
    reference row i and that pair is skipped.
    """
    nq, nr = int(query.shape[0]), int(reference.shape[0])
    dev = query.device
    best_d = torch.empty(nq, k, dtype=torch.float64, device=dev)  # [Nq, k]
    best_i = torch.empty(nq, k, dtype=torch.long, device=dev)  # [Nq, k]
    for qs in range(0, nq, batch):
        q = query[qs : qs + batch].to(torch.float64)  # [bq, D]
        bq = q.shape[0]
        run_d = torch.full((bq, k), float("inf"), dtype=torch.float64, device=dev)  # [bq, k]
        run_i = torch.full((bq, k), -1, dtype=torch.long, device=dev)  # [bq, k]
        for rs in range(0, nr, batch):
            r = reference[rs : rs + batch].to(torch.float64)  # [br, D]
            dist = torch.cdist(q, r)  # [bq, br]
            if exclude_self and qs < rs + r.shape[0] and rs < qs + bq:
                rows = torch.arange(bq, device=dev)
                cols = rows + (qs - rs)  # column of reference row qs + row
                ok = (cols >= 0) & (cols < r.shape[0])
                dist[rows[ok], cols[ok]] = float("inf")
            cand_d = torch.cat([run_d, dist], dim=1)  # [bq, k + br]
            cand_i = torch.cat([run_i, torch.arange(rs, rs + r.shape[0], device=dev).expand(bq, -1)], dim=1)
            run_d, pos = torch.topk(cand_d, k, dim=1, largest=False, sorted=True)  # [bq, k]
            run_i = cand_i.gather(1, pos)
        best_d[qs : qs + bq], best_i[qs : qs + bq] = run_d, run_i
    return best_d, best_i


def nearest_distances(
    query: torch.Tensor,
    reference: torch.Tensor,
    *,
    exclude_self: bool = False,
    batch: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance [Nq] (float64) and index [Nq] of each query row's nearest reference row.

    query [Nq, D], reference [Nr, D], Euclidean. Blocks of at most [batch, batch] distances are
    formed at a time (50k x 50k never is). ``exclude_self=True`` means query and reference are
    the same set, row for row, and a row may not be its own neighbour.
    """
    _check_matrix(query, "query")
    _check_matrix(reference, "reference")
    if query.shape[1] != reference.shape[1]:
        raise MetricInputError(
            f"query and reference differ in dimension: {query.shape[1]} vs {reference.shape[1]}"
        )
    if batch < 1:
        raise MetricInputError(f"batch must be >= 1; got {batch}")
    if exclude_self:
        if query.shape[0] != reference.shape[0]:
            raise MetricInputError("exclude_self=True needs query and reference to be the same rows")
        if query.shape[0] < 2:
            raise MetricInputError("exclude_self=True needs at least 2 rows")
    d, i = _knn(query, reference, 1, exclude_self=exclude_self, batch=batch)
    return d[:, 0], i[:, 0]


def _knn_radii(features: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Distance [N] from each row to its k-th nearest other row of the same set."""
    return _knn(features, features, k, exclude_self=True, batch=batch)[0][:, k - 1]


def _count_in_balls(
    query: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, *, strict: bool, batch: int
) -> torch.Tensor:
    """For each query row [Nq], how many balls (centers [Nc, D], radii [Nc]) contain it.

    Inside means distance < radius when ``strict``, else distance <= radius.
    """
    counts = torch.zeros(int(query.shape[0]), dtype=torch.long, device=query.device)  # [Nq]
    for qs in range(0, query.shape[0], batch):
        q = query[qs : qs + batch].to(torch.float64)  # [bq, D]
        for cs in range(0, centers.shape[0], batch):
            c = centers[cs : cs + batch].to(torch.float64)  # [bc, D]
            dist = torch.cdist(q, c)  # [bq, bc]
            r = radii[cs : cs + batch][None, :]  # [1, bc]
            inside = dist < r if strict else dist <= r
            counts[qs : qs + q.shape[0]] += inside.sum(dim=1)
    return counts


def _check_k(k: int, real: torch.Tensor, fake: torch.Tensor | None = None) -> None:
    smallest = int(real.shape[0]) if fake is None else min(int(real.shape[0]), int(fake.shape[0]))
    if k < 1 or k >= smallest:
        raise MetricInputError(
            f"k must be between 1 and (number of samples - 1) = {smallest - 1}; got k={k}"
        )


def precision_recall(
    real: torch.Tensor, fake: torch.Tensor, *, k: int = 3, batch: int = 4096
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): (precision, recall).

    real [Nr, D], fake [Nf, D]. Each sample gets a ball whose radius is the distance to its k-th
    nearest neighbour in its own set (itself excluded). Precision is the fraction of fake samples
    inside at least one real ball; recall the fraction of real samples inside at least one fake
    ball (distance <= radius, as in the reference code).
    """
    _check_pair(real, fake, min_rows=2)
    _check_k(k, real, fake)
    real_radii = _knn_radii(real, k, batch)  # [Nr]
    fake_radii = _knn_radii(fake, k, batch)  # [Nf]
    precision = (_count_in_balls(fake, real, real_radii, strict=False, batch=batch) > 0).double().mean()
    recall = (_count_in_balls(real, fake, fake_radii, strict=False, batch=batch) > 0).double().mean()
    return float(precision.item()), float(recall.item())


def density_coverage(
    real: torch.Tensor, fake: torch.Tensor, *, k: int = 5, batch: int = 4096
) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020): (density, coverage).

    real [Nr, D], fake [Nf, D]; only real samples get k-NN balls (radius: k-th nearest other real
    sample). Density = (1 / (k Nf)) * sum over fake samples of how many real balls contain it
    (can exceed 1). Coverage = fraction of real samples whose ball contains at least one fake
    sample, i.e. whose nearest fake sample is closer than its radius (strict <, as in the
    reference code).
    """
    _check_pair(real, fake, min_rows=1)
    _check_k(k, real)
    real_radii = _knn_radii(real, k, batch)  # [Nr]
    counts = _count_in_balls(fake, real, real_radii, strict=True, batch=batch)  # [Nf]
    density = counts.double().sum() / (k * fake.shape[0])
    nearest_fake, _ = _knn(real, fake, 1, exclude_self=False, batch=batch)  # [Nr, 1]
    coverage = (nearest_fake[:, 0] < real_radii).double().mean()
    return float(density.item()), float(coverage.item())


# --------------------------------------------------------------------------------------------
# Bootstrap confidence intervals
# --------------------------------------------------------------------------------------------


def _bootstrap_values(
    values_fn: Callable[[torch.Tensor], float], n: int, *, n_boot: int, seed: int
) -> torch.Tensor:
    """values_fn applied to ``n_boot`` resamples -> [n_boot] float64 (CPU).

    Resample b is ``torch.randint(0, n, (n,))`` from one CPU generator seeded with ``seed``
    (indices on the CPU; the caller moves them where its data lives).
    """
    if n < 1:
        raise MetricInputError(f"bootstrap needs n >= 1 items; got {n}")
    if n_boot < 2:
        raise MetricInputError(f"n_boot must be >= 2 for an interval; got {n_boot}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    out = torch.empty(n_boot, dtype=torch.float64)
    for b in range(n_boot):
        idx = torch.randint(0, n, (n,), generator=gen)  # [n]
        out[b] = float(values_fn(idx))
    return out


def _percentiles(values: torch.Tensor, alpha: float) -> tuple[float, float]:
    if not 0.0 < alpha < 1.0:
        raise MetricInputError(f"alpha must be in (0, 1); got {alpha}")
    q = torch.tensor([alpha / 2.0, 1.0 - alpha / 2.0], dtype=torch.float64)
    lo, hi = torch.quantile(values, q)  # linear interpolation, as numpy's default
    return float(lo.item()), float(hi.item())


def bootstrap_ci(
    values_fn: Callable[[torch.Tensor], float],
    n: int,
    *,
    n_boot: int = 20,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval (lo, hi) at level 1 - alpha.

    ``values_fn(idx)`` gets a resample of indices ``idx`` [n] (int64, CPU, drawn with
    replacement from range(n) by a generator seeded with ``seed``) and returns the statistic on
    that resample; what is resampled is the caller's choice. 20 resamples give a rough interval
    (the 2.5%/97.5% percentiles interpolate between the two most extreme values); use more for
    a tighter estimate of the interval's ends.
    """
    return _percentiles(_bootstrap_values(values_fn, n, n_boot=n_boot, seed=seed), alpha)


def fid_with_ci(
    real_stats: GaussianStats,
    fake_features: torch.Tensor,
    *,
    n_boot: int = 20,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict:
    """FID of ``fake_features`` [N, D] against fixed ``real_stats``, with a bootstrap interval.

    Returns {"value", "ci_low", "ci_high", "n_boot", "bootstrap_bias"}. The fake samples are
    resampled with replacement (the real statistics are a fixed reference, usually cached from
    many more samples). Efficiency: sqrt(S_real) comes from one eigendecomposition reused by
    every resample; a resample's moments are computed from its per-row multiplicity counts
    without copying rows; each resample then costs one covariance, two matmuls and one eigvalsh.

    FID is biased upward at finite N, and the resample FIDs are about as much above the point
    estimate as it is above the large-N value -- a plain percentile interval can then miss the
    point estimate altogether. The interval reported is therefore the percentile interval of
    the resample FIDs shifted by the bootstrap bias estimate (mean of resamples - value), i.e.
    centred on the estimate: it describes how much FID moves between draws of N fake samples.
    ``bootstrap_bias`` reports that shift. Compare FIDs only at equal N.
    """
    _check_matrix(fake_features, "fake_features", min_rows=2)
    if fake_features.shape[1] != real_stats.dim:
        raise MetricInputError(
            f"fake_features have dimension {fake_features.shape[1]} but real_stats {real_stats.dim}"
        )
    dev = fake_features.device
    mu_r = real_stats.mu.to(dev, torch.float64)  # [D]
    sigma_r = real_stats.sigma.to(dev, torch.float64)  # [D, D]
    factor_r = real_stats.sqrt_factor.to(dev)  # [D, r], one eigendecomposition for all resamples
    trace_r = float(torch.trace(sigma_r).item())
    n = int(fake_features.shape[0])

    mu_f, sigma_f = _weighted_moments(fake_features)
    value = _frechet_with_factor(mu_r, factor_r, trace_r, mu_f, sigma_f)

    def resample_fid(idx: torch.Tensor) -> float:
        counts = torch.bincount(idx, minlength=n).to(dev)  # [N] multiplicity of each row
        mu_b, sigma_b = _weighted_moments(fake_features, counts)
        return _frechet_with_factor(mu_r, factor_r, trace_r, mu_b, sigma_b)

    boot = _bootstrap_values(resample_fid, n, n_boot=n_boot, seed=seed)  # [n_boot]
    bias = float(boot.mean().item()) - value
    lo, hi = _percentiles(boot, alpha)
    return {
        "value": value,
        "ci_low": lo - bias,
        "ci_high": hi - bias,
        "n_boot": int(n_boot),
        "bootstrap_bias": bias,
    }


# --------------------------------------------------------------------------------------------
# Intervals over independent draws of generated samples
# --------------------------------------------------------------------------------------------

# Two-sided 97.5% quantiles of Student's t for 1..10 degrees of freedom (exact to 4 decimals);
# above 10 the Cornish-Fisher expansion below is within 1e-3 of the exact value.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281)
_Z975 = 1.959963984540054


def student_t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (a 95% two-sided interval).

    A table for df <= 10 and the Cornish-Fisher expansion of t in powers of 1/df above (error
    < 1e-3), so intervals need no scipy on the GPU machines.
    """
    if df < 1:
        raise MetricInputError(f"degrees of freedom must be >= 1; got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z, v = _Z975, float(df)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3))


def draw_interval(values: list[float] | tuple[float, ...]) -> tuple[float, float]:
    """95% interval for the metric of one more independent draw, from ``values`` of S >= 2 draws.

    Each value is the metric of an independent draw of n generated samples (different latent
    seeds) against the same real set. The Student-t prediction interval
    mean ± t(S-1) * s * sqrt(1 + 1/S) (s: sample std, ddof=1) says where a re-run with other
    seeds would land -- the question behind "is this change between commits real?" -- rather than
    where the mean of infinitely many draws lies (that interval would shrink with S and make every
    single-draw difference look significant).
    """
    if len(values) < 2:
        raise MetricInputError(f"an interval over draws needs at least 2 values; got {len(values)}")
    v = torch.tensor([float(x) for x in values], dtype=torch.float64)
    if not bool(torch.isfinite(v).all()):
        raise MetricInputError(f"draw values must be finite; got {values}")
    s = len(values)
    half = student_t_quantile(s - 1) * float(v.std(correction=1).item()) * (1.0 + 1.0 / s) ** 0.5
    mean = float(v.mean().item())
    return mean - half, mean + half
