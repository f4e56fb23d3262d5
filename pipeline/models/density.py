"""Ex-post density of a VAE's latent space (Ghosh et al. 2020): a Gaussian mixture fitted by EM to the
encoder's posterior means on the training set, and sampled through a reparameterisation of N(0, I).

Why: a VAE's aggregate posterior leaves holes under the N(0, I) prior (Rosca et al. 2018; Dai & Wipf
2019); decoding prior draws that fall in those holes gives blurry, off-manifold images. Sampling the
latents from a density fitted to where the encoder actually puts the data avoids them.

:class:`GaussianMixture` is a module whose ``forward`` maps N(0, I) noise [N, d] to mixture samples
[N, d], a deterministic function of the noise: the component is picked by the first coordinate's
normal CDF u = Phi(z_0) against the cumulative weights, and the rank of u inside its component's slice
of [0, 1) is again uniform and independent of the component, so Phi^-1 of it replaces z_0. The output
is then mean_k + L_k z' with z' ~ N(0, I) exactly. Everything that samples through ``latents(n, nz,
seed)`` and ``generator(z, y)`` (the sample command, the evaluate stage, the report, the MLflow model)
therefore samples the mixture without knowing about it, seeded as before.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

Covariance = Literal["full", "diag"]


class GaussianMixture(nn.Module):
    """A K-component Gaussian mixture in d dimensions held as buffers (tensors only in files).

    means [K, d]; scale_tril [K, d, d] (full: Cholesky factors of the covariances; diag: diagonal
    matrices, stored the same way so that one code path samples both); weights [K] (sum 1).
    """

    def __init__(self, means: torch.Tensor, scale_tril: torch.Tensor, weights: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("means", means.detach().clone().float())
        self.register_buffer("scale_tril", scale_tril.detach().clone().float())
        self.register_buffer("weights", weights.detach().clone().float())

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def components(self) -> int:
        return int(self.means.shape[0])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """N(0, I) noise z [N, d] -> mixture samples [N, d] (same dtype), deterministic in z."""
        # The uniform of the component choice is computed in float64: a float32 CDF would leave
        # too few distinct values inside a component of small weight for its own Gaussian draw.
        z64 = z.double()
        u = 0.5 * (1 + torch.erf(z64[:, 0] / math.sqrt(2)))  # [N] ~ U(0, 1)
        w = self.weights.double()
        upper = torch.cumsum(w, 0)  # [K]
        k = (u[:, None] >= upper[None, :-1]).sum(1)  # [N] component index, 0..K-1
        v = (u - (upper - w)[k]) / w[k]  # [N] ~ U(0, 1), independent of k
        v = v.clamp(1e-12, 1 - 1e-12)
        z0 = math.sqrt(2) * torch.erfinv(2 * v - 1)
        e = torch.cat([z0[:, None], z64[:, 1:]], 1)  # [N, d] ~ N(0, I), independent of k
        x = self.means.double()[k] + (self.scale_tril.double()[k] @ e[:, :, None]).squeeze(2)
        return x.to(z.dtype)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log density of points x [N, d] -> [N] (float64)."""
        return _log_prob(x.double(), self.means.double(), self.scale_tril.double(), self.weights.double())

    # -- files: tensors and plain data only --------------------------------------------------------

    def to_payload(self, **fit_info: Any) -> dict[str, Any]:
        return {"kind": "gmm", "state": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()},
                "fit": dict(fit_info)}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> GaussianMixture:
        s = payload["state"]
        return cls(s["means"], s["scale_tril"], s["weights"])


class DensityGenerator(nn.Module):
    """A decoder whose latents come from a fitted density: forward(z, y) = decoder(density(z), y).

    z is N(0, I) noise as everywhere else in the pipeline, so callers need no change."""

    def __init__(self, decoder: nn.Module, density: GaussianMixture) -> None:
        super().__init__()
        self.decoder, self.density = decoder, density
        self.nz = density.dim

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(self.density(z), y)


def _log_prob(x: torch.Tensor, means: torch.Tensor, tril: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(_component_log_probs(x, means, tril) + weights.clamp_min(1e-300).log()[None], 1)


def _component_log_probs(x: torch.Tensor, means: torch.Tensor, tril: torch.Tensor) -> torch.Tensor:
    """log N(x | mean_k, L_k L_k^T) for every point and component -> [N, K]."""
    d = x.shape[1]
    out = []
    for k in range(means.shape[0]):
        diff = (x - means[k]).T  # [d, N]
        sol = torch.linalg.solve_triangular(tril[k], diff, upper=False)  # L^-1 (x - mean)
        logdet = torch.log(torch.diagonal(tril[k])).sum()
        out.append(-0.5 * sol.pow(2).sum(0) - logdet - 0.5 * d * math.log(2 * math.pi))
    return torch.stack(out, 1)


def fit_gmm(x: torch.Tensor, *, components: int, covariance: Covariance = "full", seed: int = 0,
            max_iter: int = 100, tol: float = 1e-6, reg: float = 1e-6,
            max_points: int = 20_000) -> tuple[GaussianMixture, dict[str, Any]]:
    """Fit a Gaussian mixture to points x [N, d] by EM (float64, on x's device); seeded.

    Initialisation: k-means++ seeding of the means (Arthur & Vassilvitskii 2007), every covariance
    the data's, equal weights. ``reg`` times the mean per-dimension variance is added to every
    covariance's diagonal so that a component that collapses onto a few points stays invertible.
    At most ``max_points`` points (a seeded random subset) are used: the fit's cost grows with N
    and a mixture of a few components is fully determined by far fewer points.
    Returns the mixture (float32 buffers, on the CPU) and plain data about the fit.
    """
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"fit_gmm: need points [N >= 2, d], got {tuple(x.shape)}")
    gen = torch.Generator().manual_seed(seed)
    n_all = len(x)
    if n_all > max_points:
        x = x[torch.randperm(n_all, generator=gen)[:max_points].to(x.device)]
    x = x.double()
    n, d = x.shape
    k = max(1, min(components, n))
    eps = reg * float(x.var(0).mean()) + 1e-12
    eye = torch.eye(d, dtype=x.dtype, device=x.device)

    # k-means++ seeding: each next mean is a data point drawn with probability ~ squared distance.
    idx = [int(torch.randint(n, (1,), generator=gen))]
    d2 = (x - x[idx[0]]).pow(2).sum(1)
    for _ in range(1, k):
        p = (d2 / d2.sum()).cpu() if float(d2.sum()) > 0 else torch.full((n,), 1.0 / n)
        nxt = int(torch.multinomial(p, 1, generator=gen))
        idx.append(nxt)
        d2 = torch.minimum(d2, (x - x[nxt]).pow(2).sum(1))
    means = x[idx].clone()
    cov0 = torch.cov(x.T).reshape(d, d) + eps * eye
    covs = cov0.expand(k, d, d).clone()
    if covariance == "diag":
        covs = torch.diag_embed(torch.diagonal(covs, dim1=1, dim2=2))
    weights = torch.full((k,), 1.0 / k, dtype=x.dtype, device=x.device)

    prev, ll, it = -math.inf, -math.inf, 0
    for it in range(1, max_iter + 1):
        tril = torch.linalg.cholesky(covs)
        # E-step: responsibilities r [N, K].
        logp = _component_log_probs(x, means, tril) + weights.log()[None]
        norm = torch.logsumexp(logp, 1)
        ll = float(norm.mean())
        r = (logp - norm[:, None]).exp()
        # M-step.
        nk = r.sum(0) + 1e-10  # [K]
        weights = nk / n
        means = (r.T @ x) / nk[:, None]
        if covariance == "full":
            covs = torch.stack([((r[:, j, None] * (x - means[j])).T @ (x - means[j])) / nk[j] for j in range(k)])
        else:
            var = (r.T @ x.pow(2)) / nk[:, None] - means.pow(2)
            covs = torch.diag_embed(var.clamp_min(0))
        covs = covs + eps * eye
        if abs(ll - prev) <= tol * max(1.0, abs(ll)):
            break
        prev = ll
    tril = torch.linalg.cholesky(covs)
    gmm = GaussianMixture(means.cpu(), tril.cpu(), weights.cpu())
    info = {"components": k, "covariance": covariance, "iterations": it, "points": n, "points_available": n_all,
            "mean_log_likelihood": ll, "seed": seed}
    return gmm, info
