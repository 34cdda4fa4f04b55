"""Residual image discriminator (the original GANHead critic) and its losses for the optional
stage-2 GAN.

Shape legend: B batch, Ch channels (Ch_in, Ch_out of a layer), H/W image rows/columns
(H = W = img_res, a power of two).

Plain torch (no custom CUDA ops): every layer works on CPU and CUDA, float32 by default.

Architecture, with m = channel_mul (64) and ch_max = channel_max (512):
    conv_in   3x3 conv, in_channels -> m, leaky ReLU                        at img_res
    blocks    one residual block per halving img_res -> 4, channels c -> min(2c, ch_max)
              main: conv1 3x3 (c -> c) + lrelu, blur + conv2 3x3 stride 2 (c -> c') + lrelu
              skip: blur + 1x1 conv stride 2 (c -> c', no bias, no activation)
              out = (main + skip) / sqrt(2)
    head      at 4x4: minibatch standard deviation (+1 channel), conv 3x3 (c+1 -> c) + lrelu,
              fc (16 c -> c) + lrelu, fc (c -> 1) -> logit
At img_res 256 the blocks run 64 -> 128 -> 256 -> 512 -> 512 -> 512 -> 512 (256 -> 4 px).

Equalized learning rate: every weight is stored as N(0, 1) and multiplied at run time by
1 / sqrt(fan_in) (fan_in = in_channels * k * k); biases start at 0. Every activation is a
leaky ReLU (slope 0.2) of (x + bias) followed by a gain of sqrt(2). The blur is the FIR
filter [1, 3, 3, 1] x [1, 3, 3, 1] / 64 (a stored buffer), zero-padded by 2 on each side
before the 3x3 stride-2 conv and by 1 before the 1x1 one, so a block maps r to r/2 exactly.
The minibatch standard deviation shuffles the batch before grouping (groups of up to 4
samples; a random grouping on every call).

Losses (non-saturating logistic GAN, as in StyleGAN2):
    d_logistic_loss      mean softplus(fake) + mean softplus(-real)
    g_nonsaturating_loss mean softplus(-fake)
    r1_penalty           E_b |d sum(D(real)) / d real_b|^2 (create_graph=True, so it trains)

Lazy R1 (StyleGAN2): the penalty is evaluated only every `d_reg_every` (16) discriminator
steps and then weighted by `lambda_r1 / 2 * d_reg_every` (lambda_r1 = 10); `LazyR1` does
this. A typical discriminator step (the caller owns the optimizer):

    d.requires_grad_(True)
    loss = d_logistic_loss(d(real), d(fake.detach()))
    opt_d.zero_grad(); loss.backward(); opt_d.step()
    r1 = lazy_r1(d, real, step)          # None when not due
    if r1 is not None:
        opt_d.zero_grad(); r1.backward(); opt_d.step()
    d.requires_grad_(False)              # then the generator step: g_nonsaturating_loss(d(fake))
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lib.utils.errors import ModuleErrors

__all__ = ["Discriminator", "EqualConv2d", "EqualLinear", "Blur", "MinibatchStd",
           "d_logistic_loss", "g_nonsaturating_loss", "r1_penalty", "LazyR1"]

_err = ModuleErrors(__name__)
_LRELU_GAIN = math.sqrt(2.0)


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    """Leaky ReLU (slope 0.2) with gain sqrt(2). x: any shape -> same shape."""
    return F.leaky_relu(x, 0.2) * _LRELU_GAIN


class Blur(nn.Module):
    """Depthwise FIR filter with explicit zero padding: a true 2D convolution with the stored
    kernel [4, 4] = [1,3,3,1] x [1,3,3,1] / 64.

    x: [B, Ch, H, W] -> [B, Ch, H + pad0 + pad1 - 3, W + pad0 + pad1 - 3]
    """

    def __init__(self, pad: tuple[int, int]):
        super().__init__()
        k1 = torch.tensor([1.0, 3.0, 3.0, 1.0])
        k2 = torch.outer(k1, k1)
        self.register_buffer("kernel", k2 / k2.sum())  # [4, 4]
        self.pad = (int(pad[0]), int(pad[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        kh, kw = self.kernel.shape
        x = F.pad(x, (self.pad[0], self.pad[1], self.pad[0], self.pad[1]))
        w = self.kernel.flip(0, 1).to(x.dtype)[None, None].expand(c, 1, kh, kw)
        return F.conv2d(x, w, groups=c)


class EqualConv2d(nn.Module):
    """Conv2d with equalized learning rate. weight: [Ch_out, Ch_in, k, k] ~ N(0,1), used times
    1/sqrt(Ch_in k^2); bias [Ch_out] (optional), added before the activation.
    x: [B, Ch_in, H, W] -> [B, Ch_out, H', W'] (optionally leaky-ReLU'd)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True, activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size,
                                               kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.stride, self.padding, self.activate = stride, padding, activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight * self.scale, self.bias, stride=self.stride,
                     padding=self.padding)
        return _lrelu(x) if self.activate else x


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate. weight: [Ch_out, Ch_in] ~ N(0,1), used times
    1/sqrt(Ch_in); bias [Ch_out]. x: [B, Ch_in] -> [B, Ch_out] (optionally leaky-ReLU'd)."""

    def __init__(self, in_features: int, out_features: int, activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.scale = 1.0 / math.sqrt(in_features)
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.scale, self.bias)
        return _lrelu(x) if self.activate else x


class MinibatchStd(nn.Module):
    """Minibatch standard deviation: appends `num_channels` feature maps holding the
    standard deviation of the features over a group of samples.

    The batch is shuffled by a fresh random permutation (torch's RNG on x's device) and
    position p of the shuffled batch joins group p % (B / G), so groups change from call to
    call; the result is returned in the input order. The group size G is the largest divisor
    of B that is <= group_size, so any batch size works (B=6, group 4 -> groups of 3; a prime
    B=5 -> groups of 1, i.e. a constant map).
    x: [B, Ch, H, W] -> [B, Ch + num_channels, H, W]
    """

    def __init__(self, group_size: int = 4, num_channels: int = 1):
        super().__init__()
        self.group_size, self.num_channels = int(group_size), int(num_channels)

    def group_for(self, batch: int) -> int:
        """Largest divisor of `batch` not above group_size (>= 1)."""
        g = max(1, min(self.group_size, batch))
        while batch % g:
            g -= 1
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g, f = self.group_for(b), self.num_channels
        if c % f:
            raise _err(f"MinibatchStd needs a channel count ({c}) divisible by "
                       f"num_channels ({f})")
        perm = torch.randperm(b, device=x.device)             # [B]
        y = x[perm].reshape(g, -1, f, c // f, h, w)            # [g, n, f, c/f, H, W]
        y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt()       # [n, f, c/f, H, W]
        y = y.mean(dim=(2, 3, 4)).repeat(g, 1)                 # [B, f], shuffled order
        y = y[torch.argsort(perm)]                             # [B, f], input order
        return torch.cat([x, y[:, :, None, None].expand(b, f, h, w)], dim=1)


class DiscriminatorBlock(nn.Module):
    """Residual downsampling block. x: [B, Ch_in, r, r] -> [B, Ch_out, r/2, r/2]."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = EqualConv2d(in_channels, in_channels, 3, padding=1, activate=True)
        # blur (4 taps) then a stride-2 conv of size k: (4 - 2) + (k - 1) pixels of padding
        # in total, split evenly, keep r -> r/2 exact
        self.blur = Blur((2, 2))
        self.conv2 = EqualConv2d(in_channels, out_channels, 3, stride=2, activate=True)
        self.skip_blur = Blur((1, 1))
        self.skip = EqualConv2d(in_channels, out_channels, 1, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.skip(self.skip_blur(x))
        y = self.conv2(self.blur(self.conv1(x)))
        return (y + s) * (1.0 / math.sqrt(2.0))


class Discriminator(nn.Module):
    """Residual image discriminator (module docstring).

    img_res: power of two >= 8; in_channels: image channels (3 for normal or RGB images);
    channel_mul: channels of conv_in (64), doubled by every block up to channel_max (512).
    forward(img [B, in_channels, img_res, img_res]) -> logits [B, 1]
    """

    def __init__(self, img_res: int = 256, in_channels: int = 3, channel_mul: int = 64,
                 channel_max: int = 512):
        super().__init__()
        img_res = int(img_res)
        if img_res < 8 or img_res & (img_res - 1):
            raise _err(f"img_res must be a power of two >= 8, got {img_res}")
        if int(channel_mul) < 1 or int(channel_max) < 1:
            raise _err(f"channel_mul and channel_max must be >= 1, got "
                       f"{channel_mul}, {channel_max}")
        self.img_res, self.in_channels = img_res, int(in_channels)
        c = int(channel_mul)
        self.conv_in = EqualConv2d(in_channels, c, 3, padding=1, activate=True)
        blocks, r = [], img_res
        while r > 4:
            c_next = min(2 * c, int(channel_max))
            blocks.append(DiscriminatorBlock(c, c_next))
            c, r = c_next, r // 2
        self.blocks = nn.Sequential(*blocks)
        self.mbstd = MinibatchStd(group_size=4, num_channels=1)
        self.conv = EqualConv2d(c + 1, c, 3, padding=1, activate=True)
        self.fc = EqualLinear(c * 16, c, activate=True)
        self.out = EqualLinear(c, 1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """img: [B, in_channels, img_res, img_res] -> logits [B, 1]."""
        if img.ndim != 4 or img.shape[1] != self.in_channels or \
                img.shape[2] != self.img_res or img.shape[3] != self.img_res:
            raise _err(f"expected images [B, {self.in_channels}, "
                       f"{self.img_res}, {self.img_res}], got {tuple(img.shape)}")
        x = self.blocks(self.conv_in(img))
        x = self.conv(self.mbstd(x))
        return self.out(self.fc(x.flatten(1)))


def d_logistic_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator logistic loss. real_logits: [B, 1]; fake_logits: [B', 1]. Returns a
    scalar: mean(softplus(fake)) + mean(softplus(-real))."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def g_nonsaturating_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss. fake_logits: [B, 1]. Returns mean(softplus(-fake))."""
    return F.softplus(-fake_logits).mean()


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """R1 gradient penalty. real_logits: [B, 1] computed from real_images [B, Ch, H, W], which
    must require grad. Returns the scalar mean over b of sum |d sum(logits) / d image_b|^2
    (the graph is kept, so the penalty can be back-propagated into the discriminator)."""
    if not real_images.requires_grad:
        raise _err("r1_penalty needs real_images.requires_grad_(True) set "
                   "before the discriminator is evaluated on them")
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return grad.square().reshape(grad.shape[0], -1).sum(dim=1).mean()


class LazyR1:
    """Lazy R1 regularization: every `d_reg_every` steps, lambda_r1 / 2 * r1 * d_reg_every.

    __call__(d, real_images [B, Ch, H, W], step) -> scalar loss tensor, or None when the
    step is not a regularization step (step % d_reg_every != 0). The images are detached
    and re-marked as requiring grad, so any tensor may be passed. `0 * logits` is added so
    every discriminator output takes part in the graph (keeps DDP happy).
    """

    def __init__(self, lambda_r1: float = 10.0, d_reg_every: int = 16):
        if d_reg_every < 1:
            raise _err(f"d_reg_every must be >= 1, got {d_reg_every}")
        self.lambda_r1, self.d_reg_every = float(lambda_r1), int(d_reg_every)

    def due(self, step: int) -> bool:
        """Whether `step` (counted from 0) is a regularization step."""
        return int(step) % self.d_reg_every == 0

    def weight(self) -> float:
        """Factor applied to the raw penalty: lambda_r1 / 2 * d_reg_every."""
        return self.lambda_r1 / 2.0 * self.d_reg_every

    def __call__(self, d: nn.Module, real_images: torch.Tensor,
                 step: int) -> torch.Tensor | None:
        if not self.due(step):
            return None
        real = real_images.detach().requires_grad_(True)
        logits = d(real)
        return self.weight() * r1_penalty(logits, real) + 0.0 * logits.sum()
