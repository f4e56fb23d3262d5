"""Models, losses and the generator file format."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.errors import CheckpointError, UserError
from pipeline.losses import get_loss, gradient_penalty, r1_penalty
from pipeline.models import build_discriminator, build_generator, build_vae, load_generator, recipe, save_generator
from pipeline.models.layers import MinibatchStd, start_size
from pipeline.models.vae import vae_terms
from pipeline.training.ema import EMA, has_running_stats, recompute_batchnorm_stats


@pytest.mark.parametrize("arch", ["dcgan", "resnet", "biggan"])
@pytest.mark.parametrize(("size", "channels"), [(28, 1), (32, 3), (64, 3), (64, 1)])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_generator_and_discriminator_shapes(arch: str, size: int, channels: int, num_classes: int) -> None:
    torch.manual_seed(0)
    g = build_generator(arch, nz=16, ngf=8, channels=channels, size=size, num_classes=num_classes)
    d = build_discriminator(arch, ndf=8, channels=channels, size=size, num_classes=num_classes, norm="none",
                            spectral_norm=True, mbstd=arch != "biggan")
    z = torch.randn(4, 16)
    y = torch.tensor([0, 1, 2, 3]) if num_classes else None
    x = g(z, y)
    assert x.shape == (4, channels, size, size)
    assert x.min() >= -1 and x.max() <= 1
    assert d(x, y).shape == (4,)


def test_sizes_that_cannot_be_built_are_refused() -> None:
    assert start_size(28) == 7 and start_size(64) == 4 and start_size(128) == 4
    with pytest.raises(ValueError, match="preprocess.size"):
        start_size(48)


def test_dcgan64_is_the_classic_architecture() -> None:
    """nz=100, ngf=ndf=64 at 64x64 has exactly pytorch/examples' layer shapes (D without Sigmoid)."""
    nz, ngf, ndf, nc = 100, 64, 64, 3
    ref_g = nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
        nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())
    ref_d = nn.Sequential(
        nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False))
    g = build_generator("dcgan", nz=nz, ngf=ngf, channels=nc, size=64)
    d = build_discriminator("dcgan", ndf=ndf, channels=nc, size=64, norm="batch")

    def shapes(m: nn.Module) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in m.parameters()]

    assert sorted(shapes(g)) == sorted(shapes(ref_g))
    assert sorted(shapes(d)) == sorted(shapes(ref_d))
    assert sum(p.numel() for p in g.parameters()) == sum(p.numel() for p in ref_g.parameters()) == 3_576_704
    assert sum(p.numel() for p in d.parameters()) == sum(p.numel() for p in ref_d.parameters()) == 2_765_568


def test_losses_on_known_logits() -> None:
    zero = torch.zeros(8)
    ns = get_loss("nonsaturating")
    assert ns.d(zero, zero, 0.0).item() == pytest.approx(2 * math.log(2))
    assert ns.g(zero).item() == pytest.approx(math.log(2))
    # One-sided label smoothing: real target 0.9 -> 0.9*softplus(-r) + 0.1*softplus(r).
    r = torch.full((4,), 2.0)
    expected = 0.9 * math.log1p(math.exp(-2)) + 0.1 * math.log1p(math.exp(2)) + math.log(2)
    assert ns.d(r, torch.zeros(4), 0.1).item() == pytest.approx(expected, rel=1e-6)
    # Logits, not probabilities: a hugely confident wrong D still has a finite, correct loss.
    assert ns.g(torch.full((2,), -200.0)).item() == pytest.approx(200.0)
    hinge = get_loss("hinge")
    assert hinge.d(torch.full((2,), 2.0), torch.full((2,), -2.0), 0.0).item() == 0.0
    assert hinge.d(zero, zero, 0.0).item() == pytest.approx(2.0)
    w = get_loss("wasserstein")
    assert w.d(torch.ones(3), -torch.ones(3), 0.0).item() == pytest.approx(-2.0)
    assert w.g(torch.ones(3)).item() == pytest.approx(-1.0)
    ls = get_loss("lsgan")
    assert ls.d(torch.ones(3), torch.zeros(3), 0.0).item() == pytest.approx(0.0)
    with pytest.raises(UserError, match="available: nonsaturating"):
        get_loss("minimax")


def test_gradient_penalties_of_a_linear_critic() -> None:
    """D(x) = <w, x> has gradient w everywhere: GP = (|w| - 1)^2 and R1 = |w|^2."""
    w = torch.randn(1, 3, 4, 4)

    def d(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return (x * w).flatten(1).sum(1)

    real, fake = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    assert gradient_penalty(d, real, fake, None).item() == pytest.approx((w.norm().item() - 1) ** 2, rel=1e-5)
    assert r1_penalty(d, real, None).item() == pytest.approx(w.norm().item() ** 2, rel=1e-5)


def test_vae_shapes_and_terms() -> None:
    vae = build_vae(nz=6, ngf=8, ndf=8, channels=1, size=28)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    logits, mu, logvar = vae(x)
    assert logits.shape == x.shape and mu.shape == (3, 6) and logvar.shape == (3, 6)
    nll, kl = vae_terms(x, logits, torch.zeros(3, 6), torch.zeros(3, 6))
    assert nll.shape == (3,) and torch.all(kl == 0)
    _, kl2 = vae_terms(x, logits, torch.ones(3, 6), torch.zeros(3, 6))
    assert torch.allclose(kl2, torch.full((3,), 3.0))  # 0.5 * sum(mu^2) with mu = 1 over 6 dims


def test_minibatch_std_adds_one_channel_of_the_group_std() -> None:
    x = torch.randn(8, 3, 4, 4)
    y = MinibatchStd(4)(x)
    assert y.shape == (8, 4, 4, 4)
    expected = x.reshape(4, 2, 3, 4, 4).var(0, unbiased=False).add(1e-8).sqrt().mean(dim=(1, 2, 3))
    assert torch.allclose(y[:2, 3, 0, 0], expected)


def test_ema_is_a_warmed_up_exponential_average_and_copies_buffers() -> None:
    m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = EMA(m, decay=0.9)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(1) == pytest.approx(2 / 11)
    assert ema.decay_at(1000) == 0.9  # warm-up over: the configured decay
    assert EMA(m, decay=0.9, start_step=10).decay_at(5) == 0.0  # before start: a plain copy
    old = [p.clone() for p in ema.shadow.parameters()]
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
        m[1].running_mean.fill_(3.0)
    ema.update(m, step=1000)
    for o, s_, p in zip(old, ema.shadow.parameters(), m.parameters(), strict=True):
        assert torch.allclose(s_, 0.9 * o + 0.1 * p)
    assert torch.all(ema.shadow[1].running_mean == 3.0)
    # The device-tensor form (used inside CUDA graphs) computes the same update.
    twin = EMA(m, decay=0.99, start_step=3)
    twin.shadow.load_state_dict(ema.shadow.state_dict())
    ema2 = EMA(m, decay=0.99, start_step=3)
    ema2.shadow.load_state_dict(ema.shadow.state_dict())
    for step in (2, 3, 7, 500):
        twin.update(m, step)
        ema2.update_with(m, torch.tensor(step))
        for a, b in zip(twin.shadow.parameters(), ema2.shadow.parameters(), strict=True):
            assert torch.allclose(a, b, atol=1e-7), step


def test_standing_statistics_are_batch_means_and_leave_the_module_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    """recompute_batchnorm_stats on a module whose BatchNorms are plain and synchronised (a DDP run's
    G with train.sync_bn): equal-weight means of the batch statistics, in the same tensors; the
    modules' modes and momenta come back, and SyncBatchNorm keeps its own forward afterwards. Only
    rank 0 samples, so the synchronised one must not reach for its process group: here a world of
    two processes is pretended, where SyncBatchNorm's own training forward would."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "group", type("G", (), {"WORLD": None}), raising=False)
    with pytest.raises(Exception):  # noqa: B017, PT011 - what a collective without a process group raises varies
        nn.SyncBatchNorm(3).train()(torch.randn(4, 3, 2, 2))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3 * 4 * 4)
            self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.SyncBatchNorm(3, momentum=0.3)
            self.drop = nn.Dropout(0.5)

        def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            return self.bn2(self.drop(self.bn1(self.fc(z).reshape(-1, 3, 4, 4))))

    net = Net().train()
    net.bn2.eval()
    ptr = net.bn1.running_mean.data_ptr()
    gen = torch.Generator().manual_seed(0)
    zs = [torch.randn(16, 4, generator=gen) * (i + 1) + i for i in range(4)]
    assert recompute_batchnorm_stats(net, lambda i: (zs[i], None), 4) == 2
    with torch.no_grad():
        h = [net.fc(z).reshape(-1, 3, 4, 4) for z in zs]  # dropout stayed in eval mode: bn2 sees bn1's output
        assert torch.allclose(net.bn1.running_mean, torch.stack([x.mean((0, 2, 3)) for x in h]).mean(0), atol=1e-5)
        v = torch.stack([x.transpose(0, 1).flatten(1).var(1) for x in h]).mean(0)
        assert torch.allclose(net.bn1.running_var, v, rtol=1e-4)
    assert net.bn1.running_mean.data_ptr() == ptr and int(net.bn1.num_batches_tracked) == 4
    assert net.training and net.bn1.training and not net.bn2.training and net.drop.training
    assert net.bn1.momentum == 0.1 and net.bn2.momentum == 0.3 and "forward" not in net.bn2.__dict__
    assert has_running_stats(net) and not has_running_stats(nn.Linear(2, 2))
    assert recompute_batchnorm_stats(nn.Linear(2, 2), lambda i: (torch.zeros(1, 2), None), 4) == 0


def test_generator_file_roundtrip_and_refusals(tmp_path: Path) -> None:
    g = build_generator("dcgan", nz=8, ngf=8, channels=1, size=28)
    path = tmp_path / "g.pt"
    save_generator(path, g, arch="dcgan", kwargs={"nz": 8, "ngf": 8, "channels": 1, "size": 28, "num_classes": 0},
                   info={"model": "dcgan", "nz": 8, "num_classes": 0, "image_shape": [1, 28, 28], "step": 3})
    loaded, info = load_generator(path)
    z = torch.randn(2, 8)
    g.eval()
    assert torch.equal(loaded(z), g(z)) and info["step"] == 3 and not loaded.training
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a generator file"):
        load_generator(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_generator(tmp_path / "junk.pt")


class _Payload:
    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (Path(_Payload.marker),))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    _Payload.marker = str(tmp_path / "pwned")
    evil = tmp_path / "evil.pt"
    torch.save({"format": "pipeline.generator/1", "x": _Payload()}, evil)  # a real torch file
    with pytest.raises(CheckpointError, match="refused: it needs arbitrary code"):
        load_generator(evil)
    bare = tmp_path / "bare.pt"
    with open(bare, "wb") as fh:
        pickle.dump({"x": _Payload()}, fh)  # a bare pickle is not even handed to an unpickler
    with pytest.raises(CheckpointError, match="not a torch file"):
        load_generator(bare)
    assert not (tmp_path / "pwned").exists()
    pickle.loads(pickle.dumps(_Payload()))  # the payload does work when unpickled unsafely
    assert (tmp_path / "pwned").exists()


def test_recipes() -> None:
    assert recipe("wgan_gp")["n_critic"] == 5 and recipe("sngan")["spectral_norm"] is True
    biggan = recipe("biggan")
    assert (biggan["n_critic"], biggan["beta1"], biggan["lr_d"], biggan["ortho_reg"]) == (2, 0.0, 4e-4, 1e-4)
    with pytest.raises(UserError, match="available: dcgan, sngan, wgan_gp, vae, stylegan2, biggan"):
        recipe("stylegan9")


@pytest.mark.parametrize("mbstd", [False, True])
def test_channels_last_dcgan_computes_what_the_nchw_one_does(mbstd: bool) -> None:
    """The CUDA fast path's layout: 1-channel tensors get real channels_last strides, and the layers
    meeting a 1x1 map become a matrix product and a weighted sum; values and gradients match NCHW."""
    import copy

    from pipeline.models.layers import channels_last_strided

    torch.manual_seed(0)
    g = build_generator("dcgan", nz=16, ngf=8, channels=1, size=32)
    d = build_discriminator("dcgan", ndf=8, channels=1, size=32, mbstd=mbstd)
    g_cl = copy.deepcopy(g).to(memory_format=torch.channels_last)
    d_cl = copy.deepcopy(d).to(memory_format=torch.channels_last)
    for m in (g_cl, d_cl):
        for p in m.parameters():
            if p.dim() == 4:
                assert p.stride() == torch.empty_like(p, memory_format=torch.channels_last).stride()
    x = torch.randn(6, 1, 32, 32)
    assert x.stride() != channels_last_strided(x).stride() and torch.equal(channels_last_strided(x), x)
    z = torch.randn(6, 16)
    ref = d(x).sum() + d(g(z)).sum()
    out = d_cl(channels_last_strided(x)).sum() + d_cl(channels_last_strided(g_cl(z))).sum()
    assert torch.allclose(ref, out, rtol=1e-5, atol=1e-5)
    ref.backward()
    out.backward()
    for (name, a), b in zip([*g.named_parameters(), *d.named_parameters()], [*g_cl.parameters(), *d_cl.parameters()],
                            strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5), name


# --------------------------------------------------------------------------------------------
# StyleGAN2
# --------------------------------------------------------------------------------------------


def _stylegan2(size: int = 28, channels: int = 1, num_classes: int = 0) -> tuple[nn.Module, nn.Module]:
    g = build_generator("stylegan2", nz=16, ngf=8, channels=channels, size=size, num_classes=num_classes,
                        mapping_layers=2)
    d = build_discriminator("stylegan2", ndf=8, channels=channels, size=size, num_classes=num_classes, mbstd=True)
    return g, d


@pytest.mark.parametrize(("size", "channels"), [(28, 1), (32, 3), (64, 1), (64, 3)])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_stylegan2_shapes(size: int, channels: int, num_classes: int) -> None:
    torch.manual_seed(0)
    g, d = _stylegan2(size, channels, num_classes)
    z, y = torch.randn(4, 16), (torch.tensor([0, 1, 2, 9]) if num_classes else None)
    assert g.const.shape[-1] == start_size(size)  # 7x7 for 28 px, 4x4 for powers of two
    x = g.eval()(z, y)
    assert x.shape == (4, channels, size, size) and x.min() >= -1 and x.max() <= 1
    assert d(x, y).shape == (4,)
    noise = [torch.randn(s) for s in g.noise_shapes(4)]
    assert g.train()(z, y, noise=noise).shape == (4, channels, size, size)
    with pytest.raises(UserError, match="no normalisation"):
        build_discriminator("stylegan2", ndf=8, channels=channels, size=size, norm="batch")


def test_stylegan2_demodulation_normalises_each_output_channel() -> None:
    """Demodulated weights have unit L2 norm per (sample, output channel), so unit-variance inputs
    give unit-variance outputs whatever the style's scale; the batched forward equals a grouped
    convolution with those per-sample weights. Without demodulation a 10x style gives a 10x output."""
    from pipeline.models.stylegan2 import ModulatedConv2d

    torch.manual_seed(0)
    conv = ModulatedConv2d(64, 32, 3, w_dim=16)
    w = torch.randn(4, 16)
    weight = conv.modulated_weight(w)  # [N, out, in, k, k]
    assert torch.allclose(weight.square().sum(dim=(2, 3, 4)), torch.ones(4, 32), atol=1e-5)
    x = torch.randn(4, 64, 16, 16)
    grouped = torch.nn.functional.conv2d(x.reshape(1, 4 * 64, 16, 16), weight.reshape(4 * 32, 64, 3, 3), padding=1,
                                         groups=4).reshape(4, 32, 16, 16)
    assert torch.allclose(conv(x, w), grouped, atol=1e-5)
    with torch.no_grad():
        conv.affine.weight.mul_(10.0)  # styles 10x larger (their bias of 1 aside)
        conv.affine.bias.mul_(10.0)
    assert torch.allclose(conv(x, w), grouped, atol=1e-4)  # demodulation removes the style's scale
    out = conv(x, w)
    assert 0.8 < out[:, :, 1:-1, 1:-1].std().item() < 1.2
    plain = ModulatedConv2d(64, 32, 3, w_dim=16, demodulate=False)
    plain.load_state_dict(conv.state_dict())
    with torch.no_grad():
        before = plain(x, w).std()
        plain.affine.weight.mul_(10.0)
        plain.affine.bias.mul_(10.0)
        assert plain(x, w).std() / before == pytest.approx(10.0, rel=1e-4)


@pytest.mark.parametrize("shape", [(2, 3, 7, 7), (1, 1, 4, 4), (2, 5, 8, 6)])
def test_stylegan2_upsampling_is_bilinear_with_a_gradient_of_plain_sums(shape: tuple[int, ...]) -> None:
    """StyleGAN2's 2x upsampling (shifts and lerps, so no atomics in its backward on a GPU) gives
    torch's bilinear values, and its gradient equals bilinear's, at odd and non-square sizes."""
    from pipeline.models.stylegan2 import upsample2x

    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    ref = torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    out = upsample2x(x)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-12)
    upstream = torch.randn_like(ref)
    (g_ours,) = torch.autograd.grad(out, x, upstream)
    (g_ref,) = torch.autograd.grad(ref, x, upstream)
    assert torch.allclose(g_ours, g_ref, atol=1e-12)


@pytest.mark.parametrize("side", [64, 14, 7])
def test_stylegan2_downsampling_conv_equals_conv_then_average_pooling(side: int) -> None:
    """The discriminator's downsampling 3x3 convolution runs as one stride-2 4x4 convolution; it
    must give the 3x3 convolution followed by 2x2 average pooling (values and input gradients),
    also at the odd sides of 28 px data."""
    from pipeline.models.stylegan2 import EqualConv2d, lrelu

    torch.manual_seed(0)
    conv = EqualConv2d(3, 4, 3, down=True).double()
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 3, side, side, dtype=torch.float64, requires_grad=True)
    ref = lrelu(nn.functional.avg_pool2d(
        nn.functional.conv2d(x, conv.weight * conv.weight_gain, conv.bias, padding=1), 2))
    out = conv(x)
    assert out.shape == ref.shape == (2, 4, side // 2, side // 2)
    assert torch.allclose(out, ref, atol=1e-12)
    upstream = torch.randn_like(ref)
    (g_ours,) = torch.autograd.grad(out, x, upstream)
    (g_ref,) = torch.autograd.grad(ref, x, upstream)
    assert torch.allclose(g_ours, g_ref, atol=1e-12)


def test_stylegan2_truncation_and_style_mixing() -> None:
    """psi = 0 gives the w_avg image for every z, psi = 1 plain sampling; crossover at layer 0 takes
    every style from the second latent, at num_ws none; training forwards move w_avg."""
    torch.manual_seed(0)
    g, _ = _stylegan2(28, 1, 0)
    z, z2 = torch.randn(3, 16), torch.randn(3, 16)
    g.train()(z)  # a training forward updates the running mean of w
    w_avg = g.mapping.w_avg.clone()
    assert w_avg.abs().sum() > 0
    g.eval()
    with torch.no_grad():
        avg_image = g.synthesis(w_avg.expand(1, g.num_ws, -1)).clamp(-1, 1)
        assert torch.allclose(g.truncated(z, None, 0.0), avg_image.expand(3, -1, -1, -1), atol=1e-6)
        assert torch.equal(g.truncated(z, None, 1.0), g(z))
        assert not torch.allclose(g.truncated(z, None, 0.5), g(z))
        assert torch.equal(g(z, z2=z2, crossover=torch.zeros(3, dtype=torch.long)), g(z2))
        assert torch.equal(g(z, z2=z2, crossover=torch.full((3,), g.num_ws)), g(z))
        mixed = g(z, z2=z2, crossover=torch.full((3,), 3))
        assert not torch.allclose(mixed, g(z)) and not torch.allclose(mixed, g(z2))
    assert torch.equal(g.mapping.w_avg, w_avg)  # eval forwards leave it alone


def test_truncation_is_refused_for_generators_without_it() -> None:
    from pipeline.metrics.compute import sample

    g = build_generator("dcgan", nz=8, ngf=8, channels=1, size=28)
    with pytest.raises(UserError, match=r"psi 0.5: the DCGANGenerator generator has no truncation"):
        sample(g, 4, nz=8, psi=0.5)
    assert sample(g, 4, nz=8, psi=1.0)[0].shape == (4, 1, 28, 28)
    sg, _ = _stylegan2(28, 1, 0)
    full, _ = sample(sg, 4, nz=16)
    assert torch.equal(sample(sg, 4, nz=16, psi=1.0)[0], full)
    assert not torch.equal(sample(sg, 4, nz=16, psi=0.5)[0], full)


# --------------------------------------------------------------------------------------------
# BigGAN: self-attention, hierarchical latents, shared embedding, orthogonal regularisation, truncation
# --------------------------------------------------------------------------------------------


def _biggan(num_classes: int = 10, size: int = 32, nz: int = 16) -> tuple[nn.Module, nn.Module]:
    from pipeline.models.layers import init_weights

    torch.manual_seed(0)
    g = build_generator("biggan", nz=nz, ngf=8, channels=1, size=size, num_classes=num_classes)
    d = build_discriminator("biggan", ndf=8, channels=1, size=size, num_classes=num_classes)
    for m in (g, d):
        init_weights(m, "normal")  # what training does to every network
    return g, d


def test_biggan_self_attention_starts_as_the_identity_and_sits_by_size() -> None:
    from pipeline.models.biggan import SelfAttention, attention_resolution

    assert [attention_resolution(s) for s in (28, 32, 64, 128)] == [None, 16, 32, 64]
    g, d = _biggan(size=64)
    blocks = [m for m in (*g.modules(), *d.modules()) if isinstance(m, SelfAttention)]
    assert len(blocks) == 2 and all(b.gamma.item() == 0.0 for b in blocks)
    x = torch.randn(3, 8 * 2, 32, 32)  # G's attention sees 2 * ngf channels at 32x32 (64 px)
    assert torch.equal(g.attn(x), x)
    with torch.no_grad():
        g.attn.gamma.fill_(0.5)
    assert not torch.allclose(g.attn(x), x)  # a learned gamma lets attention in
    g28, _ = _biggan(size=28)
    assert not any(isinstance(m, SelfAttention) for m in g28.modules())


def test_biggan_hierarchical_latents_reach_every_block_and_the_embedding_is_shared() -> None:
    from pipeline.models.biggan import latent_chunks

    g, _ = _biggan(size=32, nz=18)
    assert latent_chunks(18, 32) == g.chunks == [5, 5, 4, 4]  # the first layer + 3 up-blocks
    assert sum(isinstance(m, nn.Embedding) for m in g.modules()) == 1  # one class embedding for all blocks
    assert all(b.bn1.gain.in_features == chunk + 18 for b, chunk in zip(g.blocks, g.chunks[1:], strict=True))
    g.eval()
    z, y = torch.randn(4, 18), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        base = g(z, y)
        start = 0
        for chunk in g.chunks:  # changing any one chunk changes the images
            moved = z.clone()
            moved[:, start : start + chunk] += 1.0
            assert (g(moved, y) - base).abs().max() > 1e-4, f"chunk at {start} is unused"
            start += chunk
        assert (g(z, torch.tensor([4, 5, 6, 7])) - base).abs().max() > 1e-4  # the class matters too
    with pytest.raises(UserError, match="train.nz: 3 is too small for biggan at 32 px"):
        build_generator("biggan", nz=3, ngf=8, channels=1, size=32)
    with pytest.raises(UserError, match="train.d_norm: 'batch' is not available for biggan"):
        build_discriminator("biggan", ndf=8, channels=1, size=32, norm="batch")


def test_orthogonal_penalty_is_zero_for_orthogonal_filters_and_positive_otherwise() -> None:
    from pipeline.losses import orthogonal_penalty

    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12))
    lengths = torch.linspace(0.5, 3.0, 8)[:, None]
    assert orthogonal_penalty([q[:8] * lengths]).item() == pytest.approx(0.0, abs=1e-5)  # norms are free
    conv = torch.randn(6, 2, 3, 3)  # [out, in, k, k]: filters flattened to 18 entries
    tall = torch.randn(20, 4)  # more rows than columns: the W^T W form
    for w in (conv, tall):
        m = w.flatten(1)
        gram = m @ m.t()
        brute = (gram * (1 - torch.eye(len(m)))).pow(2).sum()
        assert brute > 0 and orthogonal_penalty([w]).item() == pytest.approx(brute.item(), rel=1e-4)
    assert orthogonal_penalty([conv, tall]).item() == pytest.approx(
        orthogonal_penalty([conv]).item() + orthogonal_penalty([tall]).item(), rel=1e-5)


def test_biggan_truncation_is_deterministic_and_bounded_by_its_threshold() -> None:
    from pipeline.models.biggan import truncate_latents

    z = torch.randn(2000, 16, generator=torch.Generator().manual_seed(0))
    for psi in (0.1, 0.5, 0.9):
        t = torch.special.ndtri(torch.tensor((1 + psi) / 2)).item()
        zt = truncate_latents(z, psi)
        assert zt.abs().max() <= t + 1e-5 and torch.equal(zt, truncate_latents(z, psi))
        assert torch.equal(torch.sign(zt), torch.sign(z))  # monotone: each entry keeps its side
        assert (zt.abs() <= t).float().mean() == 1 and zt.std() < z.std()
    assert torch.equal(truncate_latents(z, 1.0), z)  # psi = 1: no truncation
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=f"psi: {bad} is outside"):
            truncate_latents(z, bad)
    g, _ = _biggan(size=32)
    g.eval()
    zs, y = z[:8], torch.arange(8)
    with torch.no_grad():
        assert torch.equal(g.truncated(zs, y, 0.5), g.truncated(zs, y, 0.5))  # same seed, same images
        assert torch.equal(g.truncated(zs, y, 1.0), g(zs, y))
        centre = g(torch.zeros_like(zs), y)  # the images of the mean latent
        dist = [(g.truncated(zs, y, psi) - centre).flatten(1).norm(dim=1).mean().item() for psi in (1.0, 0.5, 0.05)]
    assert dist[0] > dist[1] > dist[2]  # a smaller psi pulls samples towards the mean latent's images


def test_spectral_norm_matches_pytorch_and_iterates_explicitly_when_asked() -> None:
    """The project's spectral norm starts from the same random vectors as PyTorch's, keeps the same
    state-dict keys and gives the same weights through training and eval forwards; after
    explicit_power_iteration, forwards leave u and v alone and power_iterate advances them, to the
    same values a PyTorch training forward would."""
    from pipeline.models.layers import explicit_power_iteration, power_iterate, spectral_norm

    for make in (lambda: nn.Conv2d(4, 6, 3), lambda: nn.Linear(7, 1), lambda: nn.Embedding(10, 8),
                 lambda: nn.ConvTranspose2d(4, 3, 4)):
        torch.manual_seed(0)
        theirs = nn.utils.parametrizations.spectral_norm(make())
        torch.manual_seed(0)
        ours = spectral_norm(make())
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        for _ in range(3):
            assert torch.equal(ours.weight, theirs.weight)
        for k, v in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[k], v), k
        pairs = explicit_power_iteration(ours)
        assert len(pairs) == 1
        before = {k: v.clone() for k, v in ours.state_dict().items()}
        w = ours.weight  # a forward that only reads u and v
        assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())
        assert torch.equal(w, theirs.eval().weight)  # PyTorch's eval forward: u and v as they are
        theirs.train().weight  # noqa: B018 - PyTorch's training forward: one iteration
        power_iterate(pairs)
        for k, v in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[k], v), k
        assert torch.equal(ours.weight, theirs.eval().weight)
        for _ in range(50):
            power_iterate(pairs)
        # converged: the normalised weight's largest singular value is 1
        normalised = ours.weight.detach()
        normalised = normalised.transpose(0, 1) if isinstance(ours, nn.ConvTranspose2d) else normalised
        assert float(torch.linalg.matrix_norm(normalised.flatten(1), 2)) == pytest.approx(1.0, rel=1e-3)


def test_spectral_norm_networks_compile_with_inductor() -> None:
    """A spectral-norm discriminator called on real and then fake images before one backward (the
    GAN pattern PyTorch's own spectral norm breaks under torch.compile) gives eager's gradients."""
    from pipeline.models.layers import explicit_power_iteration, power_iterate

    torch.manual_seed(0)
    d = build_discriminator("resnet", ndf=8, channels=1, size=28, norm="none", spectral_norm=True, mbstd=False)
    pairs = explicit_power_iteration(d)
    compiled = torch.compile(d, dynamic=False)
    x, fake = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)

    def grads(net: nn.Module) -> list[torch.Tensor]:
        d.zero_grad(set_to_none=True)
        (net(x).mean() - net(fake).mean()).backward()
        return [p.grad.clone() for p in d.parameters()]

    for _ in range(2):  # before and after the vectors move (outside the graph, between the passes)
        for g_eager, g_compiled in zip(grads(d), grads(compiled), strict=True):
            assert torch.allclose(g_eager, g_compiled, rtol=1e-4, atol=1e-4), (g_eager - g_compiled).abs().max()
        with torch.no_grad():  # an update of the weights, then the power iteration that follows it
            for _, w in pairs:
                w.add_(0.5 * torch.randn_like(w) * w.std())
        before = [sn._u.clone() for sn, _ in pairs]
        power_iterate(pairs)
        moved = [float((b - sn._u).norm()) for b, (sn, _) in zip(before, pairs, strict=True) if b.numel() > 1]
        assert moved and min(moved) > 1e-3  # (a 1-row weight's u is +-1 whatever happens)


def test_spectral_norm_behind_another_parametrization_keeps_iterating_in_its_forward() -> None:
    """explicit_power_iteration switches only a spectral norm that sees the raw weight: one behind
    another parametrization would iterate on the wrong matrix, so it stays as it was, and the
    training objectives leave such a network uncompiled."""
    from pipeline.models.layers import SpectralNorm, explicit_power_iteration
    from pipeline.training.objectives import _compiled

    class Shift(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w + 1.0

    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    nn.utils.parametrize.register_parametrization(lin, "weight", Shift())
    nn.utils.parametrize.register_parametrization(lin, "weight", SpectralNorm(lin.weight))
    assert explicit_power_iteration(lin) == []
    sn = lin.parametrizations.weight[1]
    assert sn.iterate_in_forward
    before = sn._u.clone()
    lin.weight  # noqa: B018 - a training forward iterates
    assert not torch.equal(before, sn._u)
    assert _compiled(lin, "aot_eager") is lin
