"""The evaluate stage on real (tiny) trained models: every metric, its interval, the protocol, VAE and conditional scores."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import scipy.stats
import torch

from pipeline.data.tensors import load_split
from pipeline.metrics import record
from pipeline.metrics.compute import HEADLINE, memorisation, metric_set
from pipeline.metrics.math import draw_interval, student_t_quantile

from helpers_eval import TinyRun


def _load(run: TinyRun) -> tuple[dict, dict]:
    return record.read(run.metrics), json.loads(run.details.read_text())


def _numbers_only(d: dict) -> bool:
    return all(_numbers_only(v) if isinstance(v, dict) else isinstance(v, (int, float)) and not isinstance(v, bool)
               for v in d.values())


def test_metrics_json_holds_numbers_only_and_the_protocol_sits_beside_it(tiny_gan: TinyRun) -> None:
    numbers = json.loads(tiny_gan.metrics.read_text())
    assert _numbers_only(numbers) and "protocol" not in numbers and "inception" not in numbers
    beside = json.loads(record.protocol_path(tiny_gan.metrics).read_text())
    assert beside["protocol"]["extractor_sha256"] and beside["inception"]["computed"] is False
    assert record.merge(*record.split(record.read(tiny_gan.metrics))) == record.read(tiny_gan.metrics)


def test_gan_metrics_have_values_intervals_and_protocol(tiny_gan: TinyRun) -> None:
    m, details = _load(tiny_gan)
    for key in HEADLINE:
        assert math.isfinite(m[key]), key
        lo, hi = m[f"{key}_ci_low"], m[f"{key}_ci_high"]
        assert lo <= m[key] <= hi, key
    # The draws' values are in the details; the headline value is the first draw's, and the
    # interval is the Student-t prediction interval over all draws (3 draws: every draw inside).
    draws = details["draws"]["offline"]
    assert details["draws"]["seeds"] == m["protocol"]["sample_seeds"] and len(draws["kid"]) == 3
    for key in ("kid", "IS", "precision", "recall", "density", "coverage"):
        assert m[key] == draws[key][0]
        lo, hi = draw_interval(draws[key])
        bounded = (max(lo, 0.0), min(hi, 1.0)) if key in ("precision", "recall", "coverage") else (lo, hi)
        if key == "IS":
            bounded = (max(lo, 1.0), hi)
        elif key == "density":
            bounded = (max(lo, 0.0), hi)
        assert (m[f"{key}_ci_low"], m[f"{key}_ci_high"]) == pytest.approx(bounded)
        assert all(m[f"{key}_ci_low"] <= v <= m[f"{key}_ci_high"] for v in draws[key])
    assert m["fid_ci_low"] <= m["fid"] <= m["fid_ci_high"]
    assert 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["recall"] <= 1.0 and 0.0 <= m["coverage"] <= 1.0
    assert m["IS"] >= 1.0 and m["IS_real"] > m["IS"]  # 40 training steps: far from real digits
    # A 40-step generator is much worse than real images are to each other.
    assert m["fid"] > 5 * m["fid_train_vs_test"]
    assert m["kid_subset_size"] == 100 and "kid_warning" not in m
    prot = m["protocol"]
    for key in ("generated_samples", "sample_seeds", "reference_split", "extractor", "extractor_sha256", "resize",
                "seed", "dtype", "fid_ci", "other_ci"):
        assert key in prot, key
    assert prot["generated_samples"] == 100 and prot["reference_split"] == "test" and len(prot["sample_seeds"]) == 3
    ev = json.loads((tiny_gan.data.root / "reports/evaluator.json").read_text())
    assert prot["extractor_sha256"] == ev["sha256"] and len(ev["sha256"]) == 64
    assert m["inception"]["computed"] is False
    assert "inception_weights is not set" in m["inception"]["reason"]
    mem = details["memorisation"]
    assert mem["reference_size"] == 120 and len(mem["closest"]) == 16
    assert m["memorisation_ratio"] == pytest.approx(mem["nn_train_median"] / mem["nn_test_median"])


def test_vae_metrics_elbo_consistent(tiny_vae: TinyRun) -> None:
    m, _ = _load(tiny_vae)
    assert m["protocol"]["model"] == "vae" and m["protocol"]["vae_likelihood"] == "logistic"
    assert m["protocol"]["latent_sampler"] == "gmm"
    assert m["vae_elbo"] == pytest.approx(-(m["vae_recon_nll"] + m["vae_kl"]), rel=1e-9)
    assert m["vae_kl"] > 0 and m["vae_recon_nll"] > 0
    # Bits per dimension are nats per image over 784 ln 2 (a uniform 8-bit model scores 8; a
    # discretised logistic 40 steps into training may still score worse).
    assert m["vae_recon_bpd"] == pytest.approx(m["vae_recon_nll"] / (784 * math.log(2)), rel=1e-9)
    assert 0 < m["vae_recon_bpd"] < 32 and 0 < m["vae_kl_bpd"]
    for key in ("vae_elbo", "vae_recon_nll", "vae_kl", "vae_bpd", "vae_recon_bpd", "vae_kl_bpd"):
        assert m[f"{key}_ci_low"] < m[key] < m[f"{key}_ci_high"], key
        assert all(isinstance(m[k], float) for k in (key, f"{key}_ci_low", f"{key}_ci_high"))
    assert m["vae_bpd"] == pytest.approx(-m["vae_elbo"] / (784 * math.log(2)), rel=1e-9)
    assert m["vae_bpd"] == pytest.approx(m["vae_recon_bpd"] + m["vae_kl_bpd"], rel=1e-9)
    assert math.isfinite(m["vae_fid_prior"]) and m["vae_fid_prior"] != m["fid"]
    for key in HEADLINE:  # a VAE gets the same sample metrics as a GAN
        assert math.isfinite(m[key]) and f"{key}_ci_low" in m


def test_conditional_metrics(tiny_conditional: TinyRun) -> None:
    m, details = _load(tiny_conditional)
    per_class = details["intra_fid_per_class"]
    assert len(per_class) == 10 and all(v > 0 for v in per_class)
    assert m["intra_fid"] == pytest.approx(sum(per_class) / 10)
    assert 0.0 <= m["cas"] <= 1.0
    # The same classifier recipe on 100 real images: well above chance (0.1) on real test digits.
    assert m["cas_real"] > 0.3
    assert m["cas"] < m["cas_real"]  # 40 steps of a conditional GAN are no substitute for real digits
    # Per class: the two classifiers' accuracy on each class's real test images, and where the
    # sample-trained one put them; together they give the CAS and its real baseline back.
    labels = load_split(tiny_conditional.data.tensors, "test").labels
    counts = [int((labels == c).sum()) for c in range(10)]
    confusion = details["cas_confusion"]
    assert [sum(row) for row in confusion] == counts
    assert details["cas_per_class"] == [confusion[c][c] / counts[c] for c in range(10)]
    assert sum(confusion[c][c] for c in range(10)) / sum(counts) == pytest.approx(m["cas"], abs=1e-12)
    real = details["cas_real_per_class"]
    assert all(0.0 <= v <= 1.0 for v in real)
    assert sum(r * n for r, n in zip(real, counts, strict=True)) / sum(counts) == pytest.approx(m["cas_real"], abs=1e-9)


def test_metric_set_single_draw_has_no_draw_intervals() -> None:
    g = torch.Generator().manual_seed(0)
    real = torch.randn(60, 4, generator=g)
    fake = torch.randn(60, 4, generator=g) + 0.3
    out, values = metric_set(real, None, [(fake, None)], kid_subsets=3, pr_k=3, dc_k=3, n_boot=4, seed=0)
    assert "fid_ci_low" in out and "kid_ci_low" not in out and "IS" not in out
    assert values["kid"] == [out["kid"]]
    assert out["kid_warning"]  # 60 samples per set: subsets below 100


def test_draw_interval_is_a_t_prediction_interval() -> None:
    lo, hi = draw_interval([1.0, 2.0, 3.0])
    half = student_t_quantile(2) * 1.0 * math.sqrt(1 + 1 / 3)  # sample std of 1, 2, 3 is 1
    assert (lo, hi) == pytest.approx((2.0 - half, 2.0 + half))
    for df in (1, 2, 4, 9, 10, 11, 30, 200):
        assert student_t_quantile(df) == pytest.approx(float(scipy.stats.t.ppf(0.975, df)), abs=2e-3)


def test_memorisation_compares_equal_reference_sizes() -> None:
    g = torch.Generator().manual_seed(1)
    train = torch.randn(2000, 8, generator=g)
    test = torch.randn(200, 8, generator=g)
    fake = torch.randn(300, 8, generator=g)
    mem = memorisation(fake, train, test, seed=0)
    # Same distribution everywhere: with equal-size references the ratio is ~1, though the whole
    # training set (10x larger) would put every sample much nearer to some training image.
    assert mem["reference_size"] == 200
    assert 0.9 < mem["ratio"] < 1.1
    dists = [c["distance_train"] for c in mem["closest"]]
    assert dists == sorted(dists) and len(dists) == 16
    # A generator that copies half of its (here 200-image) training set.
    small_train = train[:200]
    copies = torch.cat([small_train[:150] + 1e-3, fake[:150]])
    mem_copy = memorisation(copies, small_train, test, seed=0)
    top = mem_copy["closest"][0]
    assert top["distance_train"] < 0.01 and top["train_index"] == top["sample"] < 150
    assert top["distance_test"] > 100 * top["distance_train"]
    assert mem_copy["ratio"] < 0.5 * mem["ratio"]
    assert mem_copy["fraction_closer_to_train"] > 0.7 > mem["fraction_closer_to_train"]


def test_evaluate_command_without_mlflow_dvc_or_torch_fidelity(tiny_gan: TinyRun, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU machines have torch only: the stage runs, journals its run locally, and says why."""
    from pipeline.__main__ import main

    for name in ("mlflow", "dvc", "torch_fidelity"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now fails as if not installed
    monkeypatch.setenv("PIPELINE_TRACKING", "1")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "metrics.json"
    d = tiny_gan.data
    code = main(["evaluate", "--params", str(tiny_gan.params), "--models", str(tiny_gan.models), "--tensors",
                 str(d.tensors), "--evaluator", str(d.evaluator), "--out", str(out), "--details",
                 str(tmp_path / "details.json")])
    assert code == 0
    assert json.loads(out.read_text())["fid"] == json.loads(tiny_gan.metrics.read_text())["fid"]
    (state,) = tmp_path.glob(".pipeline/tracking/*-evaluate-*/state.json")
    assert "mlflow is not installed" in json.loads(state.read_text())["error"]
    journal = (state.parent / "journal.jsonl").read_text()
    assert '"protocol.extractor_sha256"' in journal and '"type": "end", "status": "FINISHED"' in journal
