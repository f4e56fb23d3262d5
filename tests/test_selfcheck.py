"""The metrics self-test: on real digits through the trained evaluator it passes; a blind extractor fails it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.__main__ import main
from pipeline.data.tensors import load_split
from pipeline.metrics.selfcheck import BLUR_SIGMAS, NOISE_STDS, add_noise, gaussian_blur, run_selfcheck

from helpers_eval import TinyData


def test_metrics_check_command_passes_on_real_digits(tiny_data: TinyData, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "selfcheck.json"
    code = main(["metrics-check", "--tensors", str(tiny_data.tensors), "--evaluator", str(tiny_data.evaluator),
                 "--split", "all", "--device", "cpu", "--json", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert code == 0, printed
    assert report["passed"] is True and "ALL CHECKS PASSED" in printed
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == {"halves", "noise", "blur", "mode_dropping", "fid_math", "is_sharp_balanced"}
    assert all(c["passed"] is True for c in checks.values())
    halves = checks["halves"]["values"]["fid"]
    noise = [checks["noise"]["values"][f"std={s:g}"] for s in NOISE_STDS]
    blur = [checks["blur"]["values"][f"sigma={s:g}px"] for s in BLUR_SIGMAS]
    assert halves < noise[0] and all(b > a for a, b in zip(noise, noise[1:], strict=False))
    assert halves < blur[0] and all(b > a for a, b in zip(blur, blur[1:], strict=False))
    md = checks["mode_dropping"]["values"]  # JSON keys come back sorted: order by classes kept, descending
    kept = [md[f"classes_kept={c}"] for c in (10, 8, 6, 4, 2)]
    assert all(b > a for a, b in zip(kept, kept[1:], strict=False))
    assert checks["is_sharp_balanced"]["values"]["IS"] == pytest.approx(10.0, abs=1e-9)
    assert all(c["relative_difference"] <= 1e-6 for c in checks["fid_math"]["values"])
    assert report["data"]["images"] == 600 and report["data"]["labeled"] is True
    for name in checks:
        assert name in printed


def test_a_blind_extractor_fails_the_self_test(tiny_data: TinyData) -> None:
    """Features that ignore the pixels make every FID the same: the monotonicity checks must fail."""
    test = load_split(tiny_data.tensors, "test")

    def blind(x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, 8], whatever the images show
        return torch.randn(len(x), 8, generator=torch.Generator().manual_seed(len(x)))

    report = run_selfcheck(test.images, test.labels, blind, num_classes=10, seed=0)
    verdicts = {c["name"]: c["passed"] for c in report["checks"]}
    assert report["passed"] is False
    assert verdicts["noise"] is False and verdicts["blur"] is False
    assert verdicts["fid_math"] is True and verdicts["is_sharp_balanced"] is True  # the math itself is fine


def test_unlabeled_images_skip_only_mode_dropping(tiny_data: TinyData) -> None:
    test = load_split(tiny_data.tensors, "test")
    pixels = lambda x: x.float().flatten(1)[:, ::7]  # noqa: E731 - 112 raw pixel features
    report = run_selfcheck(test.images, None, pixels, seed=1)
    md = next(c for c in report["checks"] if c["name"] == "mode_dropping")
    assert md["passed"] is None and "no class labels" in md["expected"]
    assert report["data"]["labeled"] is False


def test_perturbations() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 1, 16, 16), generator=g, dtype=torch.uint8)
    noisy = add_noise(x, 0.1, seed=1)
    assert noisy.dtype == torch.uint8 and noisy.shape == x.shape
    assert 15 < float((noisy.float() - x.float()).std()) < 30  # 0.1 * 255 = 25.5, less where clipped
    assert torch.equal(add_noise(x, 0.1, seed=1), noisy)
    flat = torch.full((1, 1, 9, 9), 77, dtype=torch.uint8)
    assert torch.equal(gaussian_blur(flat, 1.5), flat)  # a constant image is its own blur
    dot = torch.zeros(1, 1, 15, 15, dtype=torch.uint8)
    dot[0, 0, 7, 7] = 255
    blurred = gaussian_blur(dot, 1.0).float()
    assert blurred[0, 0, 7, 7] < 255 and blurred[0, 0, 7, 8] > 0 and blurred[0, 0, 7, 8] == blurred[0, 0, 8, 7]
    assert 240 <= float(blurred.sum()) <= 257  # mass kept, up to rounding (tails below 0.5 round to 0)
    assert np.isclose(float(gaussian_blur(x, 0.5).float().mean()), float(x.float().mean()), rtol=0.05)
