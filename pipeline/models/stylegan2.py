"""StyleGAN2 (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN").

Generator: a mapping network (z normalised by its second moment, optionally joined by a class
embedding as in StyleGAN2-ADA's conditional mapping; fully connected layers with learning-rate
multiplier 0.01) gives an intermediate latent w, tracked by a running mean ``w_avg`` (truncation).
The synthesis network starts from a learned constant at :func:`.layers.start_size` (7x7 for 28 px
data, 4x4 for powers of two) and doubles the resolution per block with modulated, demodulated 3x3
convolutions, per-layer noise with a learned strength, and skip-architecture toRGB outputs summed
up the resolutions (bilinear upsampling in place of the paper's FIR filter). Discriminator:
residual blocks, minibatch standard deviation, projection conditioning. Every layer uses the
equalized learning rate (weights N(0, 1), scaled by He's constant at run time), so the training
config's ``init`` scheme does not apply to these networks (it only initialises ``nn.Conv2d``,
``nn.Linear`` and ``nn.Embedding`` layers, which these networks do not use).

Randomness: the networks draw no random numbers. Noise maps and style-mixing latents are explicit
inputs (the training step's draws); without them the generator uses fixed noise buffers drawn at
construction (StyleGAN2's "const" noise mode), so sampling from a seed is reproducible.

Images: the synthesis output is unbounded, as in the paper (the discriminator sees it as it is
during training); in eval mode :meth:`StyleGAN2Generator.forward` clamps it to [-1, 1], the range
every sampler of the pipeline expects.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UserError
from .layers import MinibatchStd, n_up, start_size

MAX_CHANNELS = 512  # widest layer of either network (the paper's 512)
LRELU_GAIN = math.sqrt(2.0)  # keeps unit variance through leaky ReLU 0.2 (the paper's "gain")


def width(base: int, size: int, resolution: int) -> int:
    """Channels at ``resolution`` for an image of ``size`` px: base * size / resolution, capped at
    :data:`MAX_CHANNELS` (so ``base`` is the width of the full-resolution layers)."""
    return min(base * size // resolution, MAX_CHANNELS)


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x [N, D] divided by the root mean square of each row."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


def lrelu(x: torch.Tensor) -> torch.Tensor:
    """Leaky ReLU 0.2 times sqrt(2)."""
    return F.leaky_relu(x, 0.2) * LRELU_GAIN


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """2x bilinear upsampling of [N, C, H, W] (half-pixel centres, edges clamped): the same values as
    ``F.interpolate(x, scale_factor=2, mode="bilinear")`` up to rounding, written as shifts and lerps
    along each axis so that its backward is deterministic (CUDA's bilinear backward adds with atomics,
    so two identical runs would otherwise drift apart)."""

    def along(t: torch.Tensor, dim: int) -> torch.Tensor:
        n = t.shape[dim]
        before = torch.cat([t.narrow(dim, 0, 1), t.narrow(dim, 0, n - 1)], dim)
        after = torch.cat([t.narrow(dim, 1, n - 1), t.narrow(dim, n - 1, 1)], dim)
        even, odd = torch.lerp(t, before, 0.25), torch.lerp(t, after, 0.25)
        return torch.stack([even, odd], dim + 1).flatten(dim, dim + 1)

    return along(along(x, 2), 3)


def fp32(x: torch.Tensor) -> torch.autocast:
    """A region computed in float32 whatever the surrounding autocast (styles, demodulation, mapping)."""
    return torch.autocast(x.device.type, enabled=False)


class EqualLinear(nn.Module):
    """Fully connected layer with the equalized learning rate: weight N(0, 1) / lr_mul, scaled by
    lr_mul / sqrt(in_features) at run time; bias (initialised to ``bias_init``) scaled by lr_mul."""

    def __init__(self, in_features: int, out_features: int, *, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activate: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_mul))
        self.weight_gain, self.lr_mul, self.activate = lr_mul / math.sqrt(in_features), lr_mul, activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight * self.weight_gain, self.bias * self.lr_mul)
        return lrelu(out) if self.activate else out


class EqualConv2d(nn.Module):
    """Convolution (stride 1, same padding) with the equalized learning rate; ``down``: 2x average
    pooling after the convolution (for k > 1 computed as one stride-2 convolution with the composed
    (k + 1) x (k + 1) kernel); ``activate``: leaky ReLU 0.2 with gain sqrt(2)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, *, bias: bool = True, down: bool = False,
                 activate: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1 / math.sqrt(in_channels * kernel * kernel)
        self.padding, self.down, self.activate = kernel // 2, down, activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight * self.weight_gain
        if self.down and weight.shape[-1] > 1:
            # A k x k convolution followed by 2x2 average pooling is one stride-2 convolution whose
            # (k + 1) x (k + 1) kernel is the k x k kernel convolved with the 2x2 box (/ 4): the same
            # function (the bias passes through the pooling unchanged) at 16/36 of the multiply-adds
            # for k = 3, since only the kept outputs are computed.
            weight = box_downsample_kernel(weight)
            x = F.conv2d(x, weight, self.bias, stride=2, padding=self.padding)
        else:
            x = F.conv2d(x, weight, self.bias, padding=self.padding)
            if self.down:
                x = F.avg_pool2d(x, 2)
        return lrelu(x) if self.activate else x


def box_downsample_kernel(weight: torch.Tensor) -> torch.Tensor:
    """[out, in, k, k] -> [out, in, k + 1, k + 1]: the kernel convolved with the 2x2 box filter / 4,
    so that a stride-2 convolution with it (same padding as the k x k one) equals the k x k
    convolution followed by 2x2 average pooling."""
    return 0.25 * (F.pad(weight, (0, 1, 0, 1)) + F.pad(weight, (1, 0, 0, 1))
                   + F.pad(weight, (0, 1, 1, 0)) + F.pad(weight, (1, 0, 1, 0)))


class ModulatedConv2d(nn.Module):
    """Convolution whose input channels are scaled per sample by a style (an affine map of w), with
    optional demodulation: each output channel's effective weights rescaled to unit L2 norm, which
    keeps unit-variance inputs at unit-variance outputs whatever the style (Karras et al. 2020, eq. 3).

    Computed in the batched form: scale the input by the style, convolve with the shared weight,
    scale the output by the demodulation coefficients, which equals a per-sample convolution with
    :meth:`modulated_weight` (a grouped convolution) but keeps one weight for the whole batch.
    Styles and coefficients are computed in float32 (safe under bf16 autocast).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, w_dim: int, *, demodulate: bool = True,
                 up: bool = False) -> None:
        super().__init__()
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel * kernel)
        self.padding, self.demodulate, self.up = kernel // 2, demodulate, up

    def modulated_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The effective per-sample weights [N, out, in, k, k] for latents w [N, w_dim] (float32)."""
        with fp32(w):
            styles = self.affine(w.float())
            weight = self.weight.float()[None] * self.weight_gain * styles[:, None, :, None, None]
            if self.demodulate:
                weight = weight * (weight.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8).rsqrt()
        return weight

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [N, in, H, W], w [N, w_dim] -> [N, out, H', W'] (H' = 2H when ``up``)."""
        with fp32(x):
            styles = self.affine(w.float())  # [N, in]
            weight = self.weight.float() * self.weight_gain
            # sum over (in, k, k) of (weight * style)^2 = styles^2 @ (sum over k, k of weight^2)^T
            dcoefs = (styles.square() @ weight.square().sum(dim=(2, 3)).T + 1e-8).rsqrt() if self.demodulate else None
        if self.up:
            x = upsample2x(x)
        # The scalings run in the activations' dtype (one pass each, no float32 copy of x): the styles
        # and coefficients themselves were computed in float32 above.
        x = x * styles.to(x.dtype)[:, :, None, None]
        x = F.conv2d(x, weight.to(x.dtype), padding=self.padding)
        if dcoefs is not None:
            x = x * dcoefs.to(x.dtype)[:, :, None, None]
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 convolution, noise (per pixel, learned strength), bias, leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, *, up: bool) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, w_dim, up=up)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("noise_const", torch.randn(1, 1, resolution, resolution))
        self.resolution = resolution

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """noise: [N, 1, r, r] standard normal, or None for the fixed buffer."""
        x = self.conv(x, w)
        x = x + (self.noise_const if noise is None else noise) * self.noise_strength
        return lrelu(x + self.bias[None, :, None, None])


class ToRGB(nn.Module):
    """Modulated 1x1 convolution (no demodulation) to image channels, plus a bias."""

    def __init__(self, in_channels: int, channels: int, w_dim: int) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, channels, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.conv(x, w) + self.bias[None, :, None, None]


class MappingNetwork(nn.Module):
    """z [N, nz] (and labels [N]) -> w [N, w_dim]; keeps ``w_avg``, the running mean of w."""

    def __init__(self, nz: int, w_dim: int, num_classes: int, layers: int, *, lr_mul: float = 0.01,
                 w_avg_beta: float = 0.995) -> None:
        super().__init__()
        self.num_classes, self.w_avg_beta = num_classes, w_avg_beta
        # Conditional (StyleGAN2-ADA): the one-hot label is embedded to w_dim features, normalised
        # like z and concatenated to it.
        self.embed = EqualLinear(num_classes, w_dim) if num_classes else None
        dims = [nz + (w_dim if num_classes else 0)] + [w_dim] * layers
        self.layers = nn.ModuleList(EqualLinear(a, b, lr_mul=lr_mul, activate=True) for a, b in zip(dims, dims[1:]))
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None, *, track: bool = False) -> torch.Tensor:
        """track: update ``w_avg`` with this batch's mean w (training forwards)."""
        if self.embed is not None and y is None:
            raise ValueError("a conditional StyleGAN2 generator needs labels y")
        with fp32(z):
            x = normalize_2nd_moment(z.float())
            if self.embed is not None:
                e = self.embed(F.one_hot(y, self.num_classes).float())
                x = torch.cat([x, normalize_2nd_moment(e)], dim=1)
            for layer in self.layers:
                x = layer(x)
        if track:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().float().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        return x


class StyleGAN2Generator(nn.Module):
    """Mapping + synthesis; ``g(z, y)`` -> images [N, C, size, size] (clamped to [-1, 1] in eval mode)."""

    def __init__(self, *, nz: int, ngf: int, channels: int, size: int, num_classes: int = 0,
                 mapping_layers: int = 8) -> None:
        """nz: latent size; ngf: width of the full-resolution layers (width at resolution r is
        ngf * size / r, capped at 512; w has the start resolution's width); channels/size: the output
        image; num_classes > 0: class-conditional mapping; mapping_layers: depth of the mapping network."""
        super().__init__()
        self.nz, self.channels, self.size, self.num_classes = nz, channels, size, num_classes
        s0 = start_size(size)
        resolutions = [s0 * 2**i for i in range(n_up(size) + 1)]
        self.w_dim = width(ngf, size, s0)
        self.mapping = MappingNetwork(nz, self.w_dim, num_classes, mapping_layers)
        self.const = nn.Parameter(torch.randn(self.w_dim, s0, s0))
        self.layers = nn.ModuleList()
        self.to_rgb = nn.ModuleList()
        for i, r in enumerate(resolutions):
            c_in, c_out = width(ngf, size, resolutions[max(i - 1, 0)]), width(ngf, size, r)
            if i > 0:
                self.layers.append(SynthesisLayer(c_in, c_out, self.w_dim, r, up=True))
            self.layers.append(SynthesisLayer(c_out, c_out, self.w_dim, r, up=False))
            self.to_rgb.append(ToRGB(c_out, channels, self.w_dim))
        # Style index of each layer: a block's toRGB takes the index after its last convolution
        # (the next block's first), so there are len(layers) + 1 styles.
        self.num_ws = len(self.layers) + 1

    def noise_shapes(self, n: int) -> list[tuple[int, int, int, int]]:
        """Shapes of the noise inputs of :meth:`synthesis` for a batch of n."""
        return [(n, 1, layer.resolution, layer.resolution) for layer in self.layers]

    def ws(self, z: torch.Tensor, y: torch.Tensor | None = None, *, z2: torch.Tensor | None = None,
           crossover: torch.Tensor | None = None, track: bool = False) -> torch.Tensor:
        """Per-layer latents [N, num_ws, w_dim]. Style mixing: with ``z2`` and ``crossover`` [N]
        (int, 0..num_ws), layers from ``crossover`` on take the w of ``z2`` (0: all of them,
        num_ws: none). track: update ``w_avg`` with the first latents' w."""
        w = self.mapping(z, y, track=track)
        ws = w[:, None, :].expand(-1, self.num_ws, -1)
        if z2 is not None:
            if crossover is None:
                raise ValueError("style mixing needs both z2 and crossover")
            w2 = self.mapping(z2, y)
            later = torch.arange(self.num_ws, device=w.device)[None, :] >= crossover[:, None]  # [N, num_ws]
            ws = torch.where(later[:, :, None], w2[:, None, :], ws)
        return ws

    def synthesis(self, ws: torch.Tensor, noise: list[torch.Tensor] | None = None) -> torch.Tensor:
        """ws [N, num_ws, w_dim] -> raw images [N, C, size, size] (unbounded).
        noise: one standard-normal map per layer (:meth:`noise_shapes`), or None for the fixed buffers."""
        x = self.const[None].expand(ws.shape[0], -1, -1, -1)
        img = None
        li = 0
        for bi, rgb in enumerate(self.to_rgb):
            for _ in range(1 if bi == 0 else 2):
                x = self.layers[li](x, ws[:, li], None if noise is None else noise[li])
                li += 1
            rgb_out = rgb(x, ws[:, li])
            img = rgb_out if img is None else upsample2x(img) + rgb_out
        assert img is not None
        return img

    def _output(self, img: torch.Tensor) -> torch.Tensor:
        return img if self.training else img.clamp(-1, 1)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None, *, z2: torch.Tensor | None = None,
                crossover: torch.Tensor | None = None, noise: list[torch.Tensor] | None = None) -> torch.Tensor:
        """z [N, nz] (labels y [N] when conditional) -> images [N, C, size, size]; in training mode
        the raw synthesis output (and ``w_avg`` is updated), in eval mode clamped to [-1, 1].
        z2/crossover: style mixing (:meth:`ws`); noise: explicit noise maps (:meth:`synthesis`)."""
        return self._output(self.synthesis(self.ws(z, y, z2=z2, crossover=crossover, track=self.training), noise))

    def truncated(self, z: torch.Tensor, y: torch.Tensor | None, psi: float) -> torch.Tensor:
        """Images of z with the truncation trick: w moved towards ``w_avg`` by psi (1: unchanged,
        0: every z gives the average image); conditional generators share one ``w_avg`` over the
        classes (as StyleGAN2-ADA's does)."""
        ws = self.w_avg_lerp(self.ws(z, y), psi)
        return self._output(self.synthesis(ws))

    def w_avg_lerp(self, ws: torch.Tensor, psi: float) -> torch.Tensor:
        """w_avg + psi * (ws - w_avg)."""
        return self.mapping.w_avg.to(ws.dtype).lerp(ws, psi)


class DiscriminatorBlock(nn.Module):
    """Residual block: two 3x3 convolutions (the second halves the resolution) beside a 1x1
    downsampling skip, summed and scaled by sqrt(1/2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv0 = EqualConv2d(in_channels, in_channels, 3)
        self.conv1 = EqualConv2d(in_channels, out_channels, 3, down=True)
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False, activate=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.skip(F.avg_pool2d(x, 2))
        return (skip + self.conv1(self.conv0(x))) * math.sqrt(0.5)


class StyleGAN2Discriminator(nn.Module):
    """fromRGB, residual blocks down to the start size, minibatch stddev, 3x3 conv, two dense layers;
    ``d(x, y)`` -> logits [N]. num_classes > 0: projection discriminator (label embedding dot features)."""

    def __init__(self, *, ndf: int, channels: int, size: int, num_classes: int = 0, norm: str = "none",
                 spectral_norm: bool = False, mbstd: bool = True) -> None:
        """ndf: width of the full-resolution layers (at resolution r: ndf * size / r, capped at 512);
        norm and spectral_norm: StyleGAN2's discriminator has neither (only "none" and False are
        accepted); mbstd: minibatch standard-deviation channel before the last convolution."""
        super().__init__()
        if norm != "none" or spectral_norm:
            raise UserError(f"the StyleGAN2 discriminator has no normalisation (got train.d_norm={norm!r}, "
                             f"train.spectral_norm={spectral_norm}); set both to null")
        self.num_classes = num_classes
        s0 = start_size(size)
        resolutions = [size // 2**i for i in range(n_up(size) + 1)]  # size ... s0
        self.from_rgb = EqualConv2d(channels, width(ndf, size, size), 1)
        self.blocks = nn.Sequential(*(DiscriminatorBlock(width(ndf, size, r), width(ndf, size, r // 2))
                                      for r in resolutions[:-1]))
        c = width(ndf, size, s0)
        self.mbstd = MinibatchStd() if mbstd else None
        self.conv = EqualConv2d(c + int(mbstd), c, 3)
        self.fc = EqualLinear(c * s0 * s0, c, activate=True)
        self.out = EqualLinear(c, 1)
        self.embed = EqualLinear(num_classes, c) if num_classes else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: [N, C, H, W] in [-1, 1] -> logits [N]."""
        h = self.blocks(self.from_rgb(x))
        if self.mbstd is not None:
            h = self.mbstd(h)
        h = self.fc(self.conv(h).flatten(1))
        out = self.out(h).reshape(-1)
        if self.embed is not None:
            if y is None:
                raise ValueError("a conditional StyleGAN2 discriminator needs labels y")
            e = self.embed(F.one_hot(y, self.num_classes).to(h.dtype))
            out = out + (e * h).sum(dim=1) / math.sqrt(h.shape[1])
        return out
