"""The VAE's ex-post latent density (Gaussian mixture), its place in generator files, and the 8-bit likelihoods."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.__main__ import main as cli
from pipeline.errors import UserError
from pipeline.metrics.compute import sample
from pipeline.models import build_generator, latents, load_generator, save_generator
from pipeline.models.density import DensityGenerator, GaussianMixture, fit_gmm
from pipeline.models.vae import LEVELS, bernoulli_log_normaliser, bits_per_dim, discretised_nll, vae_terms

MEANS = torch.tensor([[-4.0, 0.0], [4.0, 1.0], [0.0, 5.0]])
TRIL = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[0.7, 0.0], [0.0, 0.3]], [[0.4, 0.0], [-0.2, 1.0]]])
WEIGHTS = torch.tensor([0.2, 0.5, 0.3])


def _known() -> GaussianMixture:
    return GaussianMixture(MEANS, TRIL, WEIGHTS)


def _sorted(gmm: GaussianMixture) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Components ordered by their mean's first coordinate (EM finds them in any order)."""
    order = torch.argsort(gmm.means[:, 0])
    cov = gmm.scale_tril @ gmm.scale_tril.transpose(1, 2)
    return gmm.means[order], cov[order], gmm.weights[order]


def test_reparameterised_sampler_draws_the_mixture() -> None:
    """forward(z) with z ~ N(0, I) is distributed as the mixture: component frequencies, means, covariances."""
    gmm = _known()
    z = torch.randn(60_000, 2, generator=torch.Generator().manual_seed(0))
    x = gmm(z)
    # Which component each draw came from: the nearest mean is unambiguous for these well-separated ones.
    comp = torch.cdist(x, MEANS).argmin(1)
    freq = torch.bincount(comp, minlength=3).float() / len(x)
    assert torch.allclose(freq, WEIGHTS, atol=0.01)
    for k in range(3):
        xs = x[comp == k]
        assert torch.allclose(xs.mean(0), MEANS[k], atol=0.05)
        assert torch.allclose(torch.cov(xs.T), TRIL[k] @ TRIL[k].T, atol=0.05)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_em_recovers_a_known_mixture(covariance: str) -> None:
    tril = TRIL if covariance == "full" else torch.diag_embed(torch.diagonal(TRIL, dim1=1, dim2=2))
    truth = GaussianMixture(MEANS, tril, WEIGHTS)
    x = truth(torch.randn(20_000, 2, generator=torch.Generator().manual_seed(1)))
    fitted, info = fit_gmm(x, components=3, covariance=covariance, seed=0)
    assert info["components"] == 3 and info["iterations"] < 100 and info["covariance"] == covariance
    means, cov, weights = _sorted(fitted)
    t_means, t_cov, t_weights = _sorted(truth)
    assert torch.allclose(means, t_means, atol=0.05)
    assert torch.allclose(cov, t_cov, atol=0.06)
    assert torch.allclose(weights, t_weights, atol=0.01)
    if covariance == "diag":  # off-diagonal terms are not fitted
        assert float(cov[:, 0, 1].abs().max()) == 0.0
    # Its mean log-likelihood is that of the truth, up to sampling noise.
    assert float(fitted.log_prob(x).mean()) == pytest.approx(float(truth.log_prob(x).mean()), abs=0.01)


def test_fit_is_seeded() -> None:
    x = _known()(torch.randn(3000, 2, generator=torch.Generator().manual_seed(2)))
    a, _ = fit_gmm(x, components=4, seed=5)
    b, _ = fit_gmm(x, components=4, seed=5)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def _write(tmp_path: Path, *, density: bool, sampler: str = "gmm") -> tuple[Path, torch.nn.Module, GaussianMixture]:
    torch.manual_seed(0)
    kwargs = {"nz": 2, "ngf": 8, "channels": 1, "size": 28}
    g = build_generator("dcgan", **kwargs).eval()
    gmm = _known()
    info = {"model": "vae", "nz": 2, "num_classes": 0, "step": 7}
    if density:
        info["latent_sampler"] = sampler
    path = tmp_path / "generator.pt"
    save_generator(path, g, arch="dcgan", kwargs=kwargs, info=info,
                   latent_density=gmm.to_payload(components=3) if density else None)
    return path, g, gmm


def test_generator_file_with_density_round_trips_and_sample_uses_it(tmp_path: Path) -> None:
    path, g, gmm = _write(tmp_path, density=True)
    raw = torch.load(path, weights_only=True)  # tensors and plain data only
    assert raw["latent_density"]["kind"] == "gmm"
    assert torch.equal(raw["latent_density"]["state"]["means"], MEANS)

    loaded, info = load_generator(path)
    assert isinstance(loaded, DensityGenerator) and info["latent_sampler"] == "gmm"
    assert info["samplers"] == ["prior", "gmm"] and info["latent_density_fit"] == {"components": 3}
    imgs, _ = sample(loaded, 20, nz=2, seed=3, batch_size=8)
    with torch.no_grad():
        want = g(gmm(latents(20, 2, 3)))
    assert np.array_equal(imgs.numpy(), ((want.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy())

    # The same file, sampled from the prior on request: the decoder on N(0, I) latents.
    prior, info = load_generator(path, sampler="prior")
    assert info["latent_sampler"] == "prior" and not isinstance(prior, DensityGenerator)
    prior_imgs, _ = sample(prior, 20, nz=2, seed=3, batch_size=8)
    assert not np.array_equal(prior_imgs.numpy(), imgs.numpy())

    # The sample command goes through the same loader.
    out = tmp_path / "s.npz"
    argv = ["sample", "--checkpoint", str(path), "--n", "20", "--seed", "3", "--out", str(out), "--device", "cpu"]
    assert cli(argv) == 0
    assert np.array_equal(np.load(out)["images"], imgs.numpy())


def test_file_choice_of_sampler_and_old_files(tmp_path: Path) -> None:
    path, _, _ = _write(tmp_path, density=True, sampler="prior")
    g, info = load_generator(path)
    assert info["latent_sampler"] == "prior" and not isinstance(g, DensityGenerator)
    old, _, _ = _write(tmp_path, density=False)  # a file from before densities: samples the prior
    g, info = load_generator(old)
    assert info["latent_sampler"] == "prior" and info["samplers"] == ["prior"]
    with pytest.raises(UserError, match="latent sampler 'gmm' is not available"):
        load_generator(old, sampler="gmm")


def test_ex_post_draws_differ_from_prior_and_are_reproducible() -> None:
    gmm = _known()
    z = latents(500, 2, 11)
    a, b = gmm(z), gmm(latents(500, 2, 11))
    assert torch.equal(a, b)  # same seed, same draws
    assert not torch.allclose(a, z)
    assert not torch.allclose(gmm(latents(500, 2, 12)), a)  # another seed, other draws
    # Deterministic per row: a draw does not depend on the batch it is in.
    assert torch.equal(gmm(z[:7]), a[:7])


def test_bits_per_dim_known_cases() -> None:
    # A Bernoulli decoder with p = 1/2 normalised over the 256 levels is uniform: 8 bits per pixel,
    # whatever the image.
    x = torch.linspace(-1, 1, LEVELS).reshape(1, 1, 16, 16)
    nll, kl = vae_terms(x, torch.zeros_like(x), torch.zeros(1, 4), torch.zeros(1, 4), recon="bernoulli", discrete=True)
    assert float(kl) == 0.0
    assert bits_per_dim(float(nll), 256) == pytest.approx(8.0, abs=1e-4)
    assert float(bernoulli_log_normaliser(torch.zeros(()))) == pytest.approx(math.log(128), abs=1e-5)
    assert bits_per_dim(256 * math.log(2), 256) == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["gaussian", "logistic"])
@pytest.mark.parametrize(("loc", "log_scale"), [(0.1, -3.0), (0.97, -5.0), (-1.0, 0.0), (0.3, -6.5)])
def test_discretised_likelihoods_are_probabilities_of_the_256_levels(kind: str, loc: float, log_scale: float) -> None:
    levels = torch.linspace(-1, 1, LEVELS)
    nll = discretised_nll(levels, torch.full_like(levels, loc), torch.tensor(log_scale), kind)
    assert torch.isfinite(nll).all() and (nll >= 0).all()
    assert float(torch.logsumexp(-nll.double(), 0)) == pytest.approx(0.0, abs=1e-5)
    # Bernoulli normalised over the levels, likewise, for any logit.
    lg = torch.full_like(levels, 4 * loc)
    b = torch.nn.functional.binary_cross_entropy_with_logits(lg, (levels + 1) / 2, reduction="none")
    assert float(torch.logsumexp(-(b + bernoulli_log_normaliser(lg)).double(), 0)) == pytest.approx(0.0, abs=1e-5)


def test_malformed_or_mismatched_density_is_refused(tmp_path: Path) -> None:
    from pipeline.errors import CheckpointError

    path, _, _ = _write(tmp_path, density=True)
    raw = torch.load(path, weights_only=True)
    broken = dict(raw, latent_density={"kind": "gmm", "state": {"means": MEANS}})
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="latent density is malformed"):
        load_generator(tmp_path / "broken.pt")
    wide = GaussianMixture(torch.zeros(2, 5), torch.eye(5).expand(2, 5, 5), torch.tensor([0.5, 0.5]))
    torch.save(dict(raw, latent_density=wide.to_payload()), tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match="5 dimensions, the generator 2"):
        load_generator(tmp_path / "wide.pt")
    assert load_generator(tmp_path / "wide.pt", sampler="prior")[1]["latent_sampler"] == "prior"
