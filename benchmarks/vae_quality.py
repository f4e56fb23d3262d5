"""VAE quality on Fashion-MNIST: our VAE (each latent sampler) against pytorch/examples' MLP VAE.

Same data (the full Fashion-MNIST training split at 28x28), same number of epochs, same scorer:
the pipeline's offline evaluator (a classifier trained here on the real training split) gives FID
of 10,000 samples against the 10,000 test images. Test ELBO is computed on the test split with one
posterior sample per image, in nats per image and bits per dimension, under the 8-bit likelihood
of each model (a Bernoulli decoder normalised over the 256 pixel levels, so every model's number
is a probability of the stored images; the tutorial's own BCE-based figure is recorded beside it).

Our VAE is the pipeline's Trainer (the engine's fast path on a GPU: bf16, channels_last, CUDA
graphs, optionally torch.compile); for every variant the latent samplers are the prior N(0, I),
the ex-post Gaussian mixture the generator file carries (``train.vae_sampler: gmm``), a
diagonal-covariance mixture and mixtures of other sizes (``--components``) fitted to the same means. Samples decode the EMA decoder (as the
generator file does); the ELBO uses the trained VAE itself (as the evaluate stage does).

The MLP VAE is written as the tutorial writes it: 784-400-20 encoder, 20-400-784 decoder, ReLU,
sigmoid output, BCE summed over pixels + KL, Adam(1e-3), batch 128, pixels x / 255; its data are
shuffled on the device (no DataLoader) because only its quality is compared, not its speed.

    python benchmarks/vae_quality.py [--data DIR] [--epochs 20] [--compile] [--tag NAME]
                                     [--variants 'name:key=value,key=value;...'] [--cpu-dry-run]

Writes benchmarks/results/vae_quality[_NAME]_<gpu>.json and three sample grids (MLP VAE; the first
variant's prior and ex-post samples), also into $OUT when it is set.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from common import RESULTS, device_tag, find_fmnist, load_fmnist, machine, make_trainer, parse_overrides, write_result

from pipeline.imaging import normalize, save_grid  # noqa: E402
from pipeline.metrics.compute import sample  # noqa: E402
from pipeline.metrics.evaluator import extract, train_evaluator  # noqa: E402
from pipeline.metrics.math import frechet_distance, gaussian_stats  # noqa: E402
from pipeline.models import load_generator  # noqa: E402
from pipeline.models.density import DensityGenerator, fit_gmm  # noqa: E402
from pipeline.models.vae import bernoulli_log_normaliser, bits_per_dim  # noqa: E402

# Our VAE: the pipeline's defaults for the VAE recipe (params.yaml), at the tutorial's batch size.
BASE = {"model": "vae", "batch_size": 128}
GPU_FAST = {"precision": "bf16", "channels_last": True, "cuda_graph": True}
# The defaults first (their grids are written), then one change each, most telling first; the
# time budget skips the tail on a slow card.
DEFAULT_VARIANTS = ("default:;bernoulli:vae_likelihood=bernoulli;lr2e-4:lr_g=0.0002;nz128:nz=128;"
                    "free_bits:free_bits=0.1;gaussian:vae_likelihood=gaussian")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _ci(values: torch.Tensor) -> dict[str, float]:
    """Mean and mean ± 1.96 standard errors of per-image values [N]."""
    m = float(values.mean())
    half = 1.96 * float(values.std(correction=1)) / math.sqrt(len(values))
    return {"mean": m, "ci_low": m - half, "ci_high": m + half}


def _elbo_report(nll: torch.Tensor, kl: torch.Tensor, dims: int) -> dict[str, Any]:
    """ELBO, reconstruction NLL and KL in nats per image, and the negative ELBO, NLL and KL in bits per
    dimension (the usual sign: lower is better), each with a 95% interval over test images."""
    out: dict[str, Any] = {"elbo_nats": _ci(-(nll + kl)), "recon_nll_nats": _ci(nll), "kl_nats": _ci(kl)}
    for name, v in (("neg_elbo", nll + kl), ("recon_nll", nll), ("kl", kl)):
        out[f"{name}_bits_per_dim"] = {k: bits_per_dim(x, dims) for k, x in _ci(v).items()}
    return out


class Scorer:
    def __init__(self, data: dict[str, np.ndarray], train: torch.Tensor, test: torch.Tensor, *, device: str,
                 epochs: int, n_samples: int) -> None:
        t0 = time.perf_counter()
        self.device, self.n = device, n_samples
        self.net, self.report = train_evaluator(train.cpu().numpy(), data["train_y"][: len(train)], test.cpu().numpy(),
                                                data["test_y"][: len(test)], epochs=epochs, batch_size=256, lr=2e-3,
                                                width=32, feature_dim=128, seed=0, device=device, progress=False)
        self.report["train_seconds"] = time.perf_counter() - t0
        self.real = gaussian_stats(extract(self.net, test, device=device)[0])
        floor = extract(self.net, train[: min(n_samples, len(train))], device=device)[0]
        self.report["fid_train_vs_test"] = frechet_distance(self.real, gaussian_stats(floor))

    def fid_of_images(self, images: torch.Tensor) -> float:
        return frechet_distance(self.real, gaussian_stats(extract(self.net, images, device=self.device)[0]))

    def fid(self, generator: nn.Module, nz: int) -> tuple[float, torch.Tensor]:
        imgs, _ = sample(generator, self.n, nz=nz, seed=1, device=self.device, batch_size=1000)
        return self.fid_of_images(imgs), imgs


# -- pytorch/examples' MLP VAE ---------------------------------------------------------------------


class MLPVAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc4(F.relu(self.fc3(z)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x.view(-1, 784))
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar


def _mlp_loss(recon_x: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


class MLPGenerator(nn.Module):
    """The tutorial's sampling (z ~ N(0, I) -> decoder mean) as a generator of [-1, 1] images."""

    def __init__(self, vae: MLPVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return (self.vae.decode(z) * 2 - 1).view(-1, 1, 28, 28)


def run_mlp(train: torch.Tensor, test: torch.Tensor, *, epochs: int, device: str, scorer: Scorer) -> dict[str, Any]:
    torch.manual_seed(1)
    model = MLPVAE().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_all = train.float().div(255).view(-1, 784)
    gen = torch.Generator(device=device).manual_seed(1)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x_all), device=device, generator=gen)
        for i in range(0, len(perm), 128):
            x = x_all[perm[i : i + 128]]
            opt.zero_grad()
            recon, mu, logvar = model(x)
            loss = _mlp_loss(recon, x, mu, logvar)
            loss.backward()
            opt.step()
    _sync(device)
    seconds = time.perf_counter() - t0
    model.eval()
    nll8, bce, kls = [], [], []
    with torch.no_grad():
        torch.manual_seed(2)
        xt = test.float().div(255).view(-1, 784)
        for i in range(0, len(xt), 1000):
            x = xt[i : i + 1000]
            mu, logvar = model.encode(x)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            logits = model.decode_logits(z)
            b = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
            bce.append(b.sum(1).double().cpu())
            nll8.append((b + bernoulli_log_normaliser(logits)).sum(1).double().cpu())
            kls.append((0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)).sum(1).double().cpu())
    nll, kl = torch.cat(nll8), torch.cat(kls)
    fid, imgs = scorer.fid(MLPGenerator(model).eval(), 20)
    return {"train_seconds": seconds, "epochs": epochs, "fid": fid, "test": _elbo_report(nll, kl, 784),
            "tutorial_test_loss_nats": _ci(torch.cat(bce) + kl), "samples": imgs[:64]}


# -- our VAE ----------------------------------------------------------------------------------------


def run_ours(name: str, overrides: dict[str, Any], train: torch.Tensor, test: torch.Tensor, *, epochs: int,
             device: str, scorer: Scorer, compile_: bool, extra_components: list[int]) -> dict[str, Any]:
    cfg_in = {**BASE, **(GPU_FAST if device.startswith("cuda") else {"cuda_graph": False}),
              "compile": compile_, "log_every": 10**6, "grid_every": 10**6, "checkpoint_every": 10**6,
              "eval_every": 10**6, **overrides}
    steps_per_epoch = len(train) // int(cfg_in["batch_size"])
    cfg_in["steps"] = epochs * steps_per_epoch
    with tempfile.TemporaryDirectory() as tmp:
        tr = make_trainer(cfg_in, train, Path(tmp), device=device)
        cfg = tr.cfg
        epoch_s = []
        for _ in range(epochs):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps_per_epoch):
                tr.train_step()
            _sync(device)
            epoch_s.append(time.perf_counter() - t0)
        tr.check()
        t0 = time.perf_counter()
        tr.save_generator(Path(tmp) / "generator.pt")  # fits the ex-post mixture, as the train stage does
        fit_seconds = time.perf_counter() - t0
        out: dict[str, Any] = {"overrides": overrides, "config": cfg.semantic(),
                               "train_seconds": sum(epoch_s), "epoch_seconds": epoch_s,
                               "train_seconds_after_first_epoch": sum(epoch_s[1:]), "steps": tr.step,
                               "density_fit_seconds": fit_seconds, "modes": {}}
        vae = tr.objective.vae.eval()
        means = tr.objective.encoded_means()
        samples = {}
        for mode in ("prior", "gmm"):
            g, info = load_generator(Path(tmp) / "generator.pt", device=device, sampler=mode)
            out["modes"][mode] = {"fid": (r := scorer.fid(g, cfg.nz))[0]}
            samples[mode] = r[1][:64]
            if mode == "gmm":
                out["modes"][mode]["fit"] = info["latent_density_fit"]
        g_prior, _ = load_generator(Path(tmp) / "generator.pt", device=device, sampler="prior")
        # Other mixtures on the same means and decoder: which covariance and how many components pay.
        others = {"gmm_diag": (cfg.gmm_components, "diag")}
        others.update({f"gmm_k{k}": (k, cfg.gmm_covariance) for k in extra_components if k != cfg.gmm_components})
        for mode, (k, cov) in others.items():
            mixture, fit_info = fit_gmm(means, components=k, covariance=cov, seed=cfg.seed)
            g_mode = DensityGenerator(g_prior, mixture.to(device)).eval()
            out["modes"][mode] = {"fid": scorer.fid(g_mode, cfg.nz)[0], "fit": fit_info}
        prior = out["modes"]["prior"]["fid"]
        for mode in out["modes"]:
            if mode != "prior":
                out["modes"][mode]["fid_reduction_vs_prior"] = 1 - out["modes"][mode]["fid"] / prior
        nlls, kls, bces = [], [], []
        with torch.no_grad():
            torch.manual_seed(2)
            for i in range(0, len(test), 1000):
                x = normalize(test[i : i + 1000].to(device))
                logits, mu, logvar = vae(x)
                nll, kl = vae.terms(x, logits.float(), mu.float(), logvar.float(), discrete=True)
                nlls.append(nll.double().cpu())
                kls.append(kl.double().cpu())
                if vae.likelihood == "bernoulli":  # the tutorial's figure (BCE on [0, 1] pixels), for comparison
                    bces.append(vae.terms(x, logits.float(), mu.float(), logvar.float())[0].double().cpu())
        out["test"] = _elbo_report(torch.cat(nlls), torch.cat(kls), int(np.prod(test.shape[1:])))
        if bces:
            out["tutorial_test_loss_nats"] = _ci(torch.cat(bces) + torch.cat(kls))
        out["samples"] = samples
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="folder of Fashion-MNIST IDX .gz files")
    ap.add_argument("--epochs", type=int, default=20, help="epochs of every model (ours and the MLP VAE)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="our VAE variants: 'name:key=value,key=value;name2:...' (params.train keys over the "
                         "defaults); the first one's grids are written")
    ap.add_argument("--compile", action="store_true", help="torch.compile our VAE (train.compile)")
    ap.add_argument("--n-samples", type=int, default=10_000, help="generated images per FID")
    ap.add_argument("--evaluator-epochs", type=int, default=3)
    ap.add_argument("--cpu-dry-run", action="store_true", help="CPU, 2,000 training / 1,000 test images, 1 epoch")
    ap.add_argument("--components", default="10,50",
                    help="comma-separated component counts of further full mixtures scored on each variant's means")
    ap.add_argument("--tag", default="", help="suffix of the result and grid names (keeps runs apart)")
    ap.add_argument("--budget-s", type=float, default=270.0,
                    help="start no further variant after this many seconds (the first always runs)")
    ap.add_argument("--limit", type=int, default=None, help="use the first N training images (quick runs)")
    ap.add_argument("--scale-lr-mult", type=float, default=None,
                    help="experiment: learning rate of the likelihood's log-scale relative to lr_g "
                         "(the engine's if unset)")
    args = ap.parse_args()
    if args.scale_lr_mult is not None:
        from pipeline.training.objectives import VAEObjective  # noqa: PLC0415

        VAEObjective.SCALE_LR_MULT = args.scale_lr_mult

    device = "cuda" if torch.cuda.is_available() and not args.cpu_dry_run else "cpu"
    data = load_fmnist(find_fmnist(args.data))
    n_train = 2000 if args.cpu_dry_run else (args.limit or len(data["train_x"]))
    n_test = 1000 if args.cpu_dry_run else len(data["test_x"])
    epochs = 1 if args.cpu_dry_run else args.epochs
    n_samples = 1000 if args.cpu_dry_run else args.n_samples
    train = torch.from_numpy(data["train_x"][:n_train].copy())[:, None].to(device)
    test = torch.from_numpy(data["test_x"][:n_test].copy())[:, None].to(device)
    t_all = time.perf_counter()
    scorer = Scorer(data, train, test, device=device, epochs=1 if args.cpu_dry_run else args.evaluator_epochs,
                    n_samples=n_samples)
    print(f"evaluator: test accuracy {scorer.report.get('test_accuracy')}, "
          f"real-vs-real FID {scorer.report['fid_train_vs_test']:.3f}", flush=True)
    mlp = run_mlp(train, test, epochs=epochs, device=device, scorer=scorer)
    print(f"MLP VAE: FID {mlp['fid']:.2f}, test ELBO {mlp['test']['elbo_nats']['mean']:.1f} nats "
          f"({mlp['test']['neg_elbo_bits_per_dim']['mean']:.3f} bits/dim), {mlp['train_seconds']:.1f} s", flush=True)
    variants = []
    for part in filter(None, args.variants.split(";")):
        name, _, kv = part.partition(":")
        variants.append((name.strip(), parse_overrides(kv)))
    ours: dict[str, Any] = {}
    skipped = []
    for name, overrides in variants:
        if ours and time.perf_counter() - t_all > args.budget_s:  # keep one invocation inside its time slot
            skipped.append(name)
            print(f"{name}: skipped (past --budget-s {args.budget_s:.0f} s)", flush=True)
            continue
        r = run_ours(name, overrides, train, test, epochs=epochs, device=device, scorer=scorer, compile_=args.compile,
                     extra_components=[int(k) for k in args.components.split(",") if k])
        ours[name] = r
        m = r["modes"]
        print(f"{name}: FID " + ", ".join(f"{k} {v['fid']:.2f}" for k, v in m.items()) + "; "
              f"test ELBO {r['test']['elbo_nats']['mean']:.1f} nats ({r['test']['neg_elbo_bits_per_dim']['mean']:.3f} "
              f"bits/dim); train {r['train_seconds']:.1f} s "
              f"({r['train_seconds_after_first_epoch']:.1f} s after epoch 1)",
              flush=True)

    result = ("vae_quality_cpu_dry_run" if args.cpu_dry_run else "vae_quality") + (f"_{args.tag}" if args.tag else "")
    grids = {f"{result}_mlp_samples_{device_tag()}.png": mlp.pop("samples")}
    first = next(iter(ours))
    for mode in ("prior", "gmm"):
        grids[f"{result}_{first}_{mode}_samples_{device_tag()}.png"] = ours[first]["samples"][mode]
    for r in ours.values():
        r.pop("samples")
    goals = {}
    for name, r in ours.items():
        best_mode = min(("prior", "gmm"), key=lambda k: r["modes"][k]["fid"])
        goals[name] = {
            "fid_ratio_to_mlp": r["modes"]["gmm"]["fid"] / mlp["fid"],
            "fid_at_most_half_of_mlp": r["modes"]["gmm"]["fid"] <= 0.5 * mlp["fid"],
            "better_test_elbo_than_mlp": r["test"]["elbo_nats"]["mean"] > mlp["test"]["elbo_nats"]["mean"],
            "ex_post_fid_reduction": r["modes"]["gmm"]["fid_reduction_vs_prior"],
            "ex_post_lowers_fid_by_30pct": r["modes"]["gmm"]["fid_reduction_vs_prior"] >= 0.30,
            "train_seconds": r["train_seconds"], "under_15s": r["train_seconds"] < 15.0, "best_mode": best_mode,
        }
    from pipeline.training.objectives import VAEObjective  # noqa: PLC0415

    payload = {"benchmark": "vae_quality", "run": "cpu dry run" if args.cpu_dry_run else "full",
               "scale_lr_mult": VAEObjective.SCALE_LR_MULT, "machine": machine(), "device": device,
               "data": {"train_images": n_train, "test_images": n_test, "size": 28, "epochs": epochs,
                        "generated_per_fid": n_samples, "fid_seed": 1},
               "evaluator": scorer.report, "mlp_vae": mlp, "ours": ours, "goals": goals,
               "skipped_variants": skipped, "grids": sorted(grids), "total_seconds": time.perf_counter() - t_all}
    path = write_result(result, payload)
    out = os.environ.get("OUT")
    for fname, imgs in grids.items():
        save_grid(imgs.numpy(), RESULTS / fname, nrow=8, scale=2)
        if out:
            save_grid(imgs.numpy(), Path(out) / fname, nrow=8, scale=2)
    print(f"wrote {path} and {len(grids)} grids ({time.perf_counter() - t_all:.0f} s)")


if __name__ == "__main__":
    main()
