"""Residual image discriminator and GAN losses (lib/model/discriminator.py)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lib.model.discriminator import (
    Blur,
    Discriminator,
    EqualConv2d,
    EqualLinear,
    LazyR1,
    MinibatchStd,
    d_logistic_loss,
    g_nonsaturating_loss,
    r1_penalty,
)

SMALL = dict(channel_mul=8, channel_max=16)  # 8 channels at full resolution, then 16: fast on CPU


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions run far faster single-threaded on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


@pytest.mark.parametrize("res", [32, 64, 256])
@pytest.mark.parametrize("batch", [2, 4])
def test_output_shape(res, batch):
    torch.manual_seed(0)
    d = Discriminator(res, **SMALL)
    out = d(torch.rand(batch, 3, res, res) * 2 - 1)
    assert out.shape == (batch, 1)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # One residual block per halving from res down to 4.
    assert len(d.blocks) == int(math.log2(res)) - 2


@pytest.mark.parametrize("batch", [1, 3, 5, 6])
def test_batch_not_divisible_by_group(batch):
    d = Discriminator(32, **SMALL)
    assert d(torch.randn(batch, 3, 32, 32)).shape == (batch, 1)


@pytest.mark.parametrize("batch,group", [(2, 2), (4, 4), (8, 4), (6, 3), (5, 1), (3, 3), (1, 1)])
def test_mbstd_group_choice(batch, group):
    assert MinibatchStd(4).group_for(batch) == group


def test_mbstd_matches_float64_reference():
    torch.manual_seed(1)
    x = torch.randn(8, 6, 4, 4, dtype=torch.float64)
    torch.manual_seed(7)
    perm = torch.randperm(8).tolist()  # the layer draws the same permutation
    torch.manual_seed(7)
    y = MinibatchStd(group_size=4, num_channels=1)(x)
    assert y.shape == (8, 7, 4, 4)
    assert torch.equal(y[:, :6], x)
    n = 8 // 4  # position p of the shuffled batch (sample perm[p]) is in group p % n
    for b in range(8):
        p = perm.index(b)
        members = x[[perm[q] for q in range(8) if q % n == p % n]]     # [4, 6, 4, 4]
        std = (members.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
        assert torch.allclose(y[b, 6], std.expand(4, 4), atol=1e-12)


def test_mbstd_groups_are_shuffled():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 2, 2)
    seen = {round(MinibatchStd(4)(x)[0, 3, 0, 0].item(), 6) for _ in range(20)}
    # without the shuffle sample 0 would always share a group with samples 2, 4, 6; shuffled,
    # its group is any of the C(7, 3) = 35 sets of companions
    assert len(seen) > 5


# The original discriminator's state_dict, written from its architecture (conv layers are a
# Sequential of [blur,] conv and a bias-carrying activation), with our key for each entry.
def _original_layout(res: int = 256, mul: int = 64, cmax: int = 512):
    rows = [("conv_in.0.weight", "conv_in.weight", (mul, 3, 3, 3)),
            ("conv_in.1.bias", "conv_in.bias", (mul,))]
    c, j = mul, 0
    while res > 4:
        o, L, B = min(2 * c, cmax), f"layers.{j}", f"blocks.{j}"
        rows += [(f"{L}.conv1.0.weight", f"{B}.conv1.weight", (c, c, 3, 3)),
                 (f"{L}.conv1.1.bias", f"{B}.conv1.bias", (c,)),
                 (f"{L}.conv2.0.kernel", f"{B}.blur.kernel", (4, 4)),
                 (f"{L}.conv2.1.weight", f"{B}.conv2.weight", (o, c, 3, 3)),
                 (f"{L}.conv2.2.bias", f"{B}.conv2.bias", (o,)),
                 (f"{L}.skip.0.kernel", f"{B}.skip_blur.kernel", (4, 4)),
                 (f"{L}.skip.1.weight", f"{B}.skip.weight", (o, c, 1, 1))]
        c, j, res = o, j + 1, res // 2
    rows += [("disc_out.conv_stddev.0.weight", "conv.weight", (c, c + 1, 3, 3)),
             ("disc_out.conv_stddev.1.bias", "conv.bias", (c,)),
             ("disc_out.final_linear.1.weight", "fc.weight", (c, 16 * c)),
             ("disc_out.final_linear.1.bias", "fc.bias", (c,)),
             ("disc_out.final_linear.2.weight", "out.weight", (1, c)),
             ("disc_out.final_linear.2.bias", "out.bias", (1,))]
    return rows


def test_default_layout_maps_one_to_one():
    torch.manual_seed(0)
    d = Discriminator()  # img_res 256, channel_mul 64, channel_max 512
    ours = {k: tuple(v.shape) for k, v in d.state_dict().items()}
    rows = _original_layout()
    assert ours == {k: s for _, k, s in rows}
    assert len(d.blocks) == 6 and len(rows) == 2 + 7 * 6 + 6
    widths = [d.conv_in.weight.shape[0]] + [b.conv2.weight.shape[0] for b in d.blocks]
    assert widths == [64, 128, 256, 512, 512, 512, 512]
    k1 = torch.tensor([1.0, 3.0, 3.0, 1.0])
    for b in d.blocks:
        assert torch.equal(b.blur.kernel, torch.outer(k1, k1) / 64)
        assert b.skip.bias is None


def test_default_widths_forward_backward():
    """Default channel widths (64 -> 512) on 32-pixel images: 3 blocks, finite gradients."""
    torch.manual_seed(0)
    d = Discriminator(32)
    assert {k: tuple(v.shape) for k, v in d.state_dict().items()} == \
        {k: s for _, k, s in _original_layout(32)}
    real = torch.rand(4, 3, 32, 32, requires_grad=True)
    logits = d(real)
    assert logits.shape == (4, 1)
    loss = d_logistic_loss(logits, d(torch.rand(4, 3, 32, 32))) + r1_penalty(logits, real)
    loss.backward()
    for name, p in d.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_invalid_resolution_and_input():
    for bad in (4, 12, 48):
        with pytest.raises(ValueError, match="power of two"):
            Discriminator(bad, **SMALL)
    d = Discriminator(32, **SMALL)
    with pytest.raises(ValueError, match="expected images"):
        d(torch.randn(2, 3, 64, 64))


def test_equalized_lr_weights():
    torch.manual_seed(0)
    d = Discriminator(64, channel_mul=16, channel_max=64)
    layers = [m for m in d.modules() if isinstance(m, (EqualConv2d, EqualLinear))]
    weights = torch.cat([m.weight.detach().flatten() for m in layers])
    # Stored parameters are N(0, 1) ...
    assert abs(weights.mean().item()) < 0.01 and abs(weights.std().item() - 1.0) < 0.01
    for m in layers:
        if m.bias is not None:
            assert torch.count_nonzero(m.bias) == 0
        fan_in = m.weight[0].numel()
        assert m.scale == pytest.approx(1.0 / math.sqrt(fan_in))
    # ... and scaled by 1/sqrt(fan_in) at run time: ones through ones gives sqrt(fan_in).
    conv = EqualConv2d(12, 5, 3, padding=1)
    nn.init.ones_(conv.weight)
    assert torch.allclose(conv(torch.ones(1, 12, 5, 5))[0, :, 2, 2],
                          torch.full((5,), math.sqrt(12 * 9)))
    lin = EqualLinear(49, 3)
    nn.init.ones_(lin.weight)
    assert torch.allclose(lin(torch.ones(2, 49)), torch.full((2, 3), 7.0))
    # Unit-variance input keeps unit variance through a wide layer (no activation).
    lin = EqualLinear(512, 512)
    assert abs(lin(torch.randn(256, 512)).std().item() - 1.0) < 0.05


def test_leaky_relu_gain():
    lin = EqualLinear(1, 1, activate=True)
    nn.init.ones_(lin.weight)
    out = lin(torch.tensor([[2.0], [-2.0]]))
    assert torch.allclose(out[:, 0], torch.tensor([2.0, -0.4]) * math.sqrt(2.0))


def test_blur_normalized_and_sizes():
    x = torch.full((1, 2, 16, 16), 3.0)
    y = Blur((2, 2))(x)
    assert y.shape == (1, 2, 17, 17)
    assert torch.allclose(y[..., 3:-3, 3:-3], torch.full_like(y[..., 3:-3, 3:-3], 3.0))
    k = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8
    impulse = torch.zeros(1, 1, 7, 7)
    impulse[0, 0, 3, 3] = 1.0
    assert torch.allclose(Blur((0, 0))(impulse)[0, 0, :4, :4], torch.outer(k, k).flip(0, 1))
    # a true convolution (as the original's FIR filter): the impulse response is the kernel
    blur = Blur((0, 0))
    blur.kernel.copy_(torch.arange(16.0).reshape(4, 4))
    assert torch.equal(blur(impulse)[0, 0, :4, :4], torch.arange(16.0).reshape(4, 4))


def test_block_halves_resolution():
    d = Discriminator(16, **SMALL)
    x = d.conv_in(torch.randn(2, 3, 16, 16))
    assert x.shape == (2, 8, 16, 16)
    assert d.blocks[0](x).shape == (2, 16, 8, 8)
    assert d.blocks[1](d.blocks[0](x)).shape == (2, 16, 4, 4)


def test_losses_match_hand_computed():
    real = torch.tensor([[0.0], [2.0]])
    fake = torch.tensor([[-1.0], [1.0]])
    d_expected = (_softplus(-1) + _softplus(1)) / 2 + (_softplus(0) + _softplus(-2)) / 2
    assert d_logistic_loss(real, fake).item() == pytest.approx(d_expected, rel=1e-6)
    assert g_nonsaturating_loss(fake).item() == pytest.approx(
        (_softplus(1) + _softplus(-1)) / 2, rel=1e-6)
    # Logistic loss is log(2) per term when D cannot tell.
    z = torch.zeros(3, 1)
    assert d_logistic_loss(z, z).item() == pytest.approx(2 * math.log(2), rel=1e-6)


class _LinearD(nn.Module):
    """D(x) = sum(a * x) per sample: its R1 penalty is |a|^2."""

    def __init__(self, shape):
        super().__init__()
        self.a = nn.Parameter(torch.randn(shape, dtype=torch.float64))

    def forward(self, x):
        return (x * self.a).flatten(1).sum(1, keepdim=True)


def test_r1_penalty_linear_analytic():
    torch.manual_seed(0)
    d = _LinearD((3, 4, 4))
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    pen = r1_penalty(d(x), x)
    a2 = d.a.detach().square().sum()
    assert torch.allclose(pen, a2)
    # create_graph: the penalty is differentiable w.r.t. D's parameters (d|a|^2/da = 2a).
    pen.backward()
    assert torch.allclose(d.a.grad, 2 * d.a.detach())


def test_r1_penalty_finite_difference():
    """Quadratic D(x)_b = 0.5 * |x_b|^2 * c: grad = c x_b, penalty = mean_b c^2 |x_b|^2; also
    the gradient of a real discriminator against central differences (float64)."""
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    pen = r1_penalty(0.5 * 1.5 * x.square().flatten(1).sum(1, keepdim=True), x)
    assert torch.allclose(pen, (1.5 ** 2 * x.detach().square().flatten(1).sum(1)).mean())

    torch.manual_seed(2)
    d = Discriminator(8, **SMALL).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    pen = r1_penalty(d(x), x)
    g = torch.autograd.grad(d(x).sum(), x)[0]
    assert torch.allclose(pen, g.square().flatten(1).sum(1).mean())
    eps = 1e-6
    for _ in range(3):
        v = torch.randn_like(x)
        with torch.no_grad():
            fd = (d(x + eps * v).sum() - d(x - eps * v).sum()) / (2 * eps)
        assert torch.allclose(fd, (g * v).sum(), rtol=1e-5, atol=1e-8)


def test_r1_requires_grad_error():
    d = _LinearD((3, 4, 4))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="requires_grad"):
        r1_penalty(d(x), x)


def test_lazy_r1_schedule_and_weight():
    torch.manual_seed(0)
    d = _LinearD((3, 4, 4))
    lazy = LazyR1(lambda_r1=10.0, d_reg_every=16)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert [s for s in range(40) if lazy.due(s)] == [0, 16, 32]
    assert lazy(d, x, 5) is None
    loss = lazy(d, x, 16)
    assert torch.allclose(loss, 10.0 / 2 * 16 * d.a.detach().square().sum())
    loss.backward()
    assert d.a.grad is not None


def _smooth_images(n, res, gen):
    """Low-frequency sinusoid images in [-1, 1]: [n, 3, res, res]."""
    t = torch.linspace(0, 1, res)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    f = 1 + torch.rand(n, 3, 1, 1, generator=gen)
    ph = torch.rand(n, 3, 1, 1, generator=gen) * 6.28
    return 0.8 * torch.sin(f * 3.14 * (xx + 0.5 * yy) + ph)


def test_training_separates_real_and_fake():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    res = 16
    d = Discriminator(res, **SMALL)
    opt = torch.optim.Adam(d.parameters(), lr=2e-3, betas=(0.0, 0.99))
    lazy = LazyR1(lambda_r1=10.0, d_reg_every=4)
    for step in range(40):
        real = _smooth_images(8, res, gen)
        fake = torch.rand(8, 3, res, res, generator=gen) * 2 - 1
        loss = d_logistic_loss(d(real), d(fake))
        opt.zero_grad()
        loss.backward()
        opt.step()
        r1 = lazy(d, real, step)
        if r1 is not None:
            opt.zero_grad()
            r1.backward()
            opt.step()
    with torch.no_grad():
        real_l = d(_smooth_images(16, res, gen))
        fake_l = d(torch.rand(16, 3, res, res, generator=gen) * 2 - 1)
    assert real_l.min() > fake_l.max()
    assert (real_l.mean() - fake_l.mean()).item() > 0.5
    assert d_logistic_loss(real_l, fake_l).item() < 2 * math.log(2) * 0.75


def test_gradients_reach_all_parameters():
    torch.manual_seed(0)
    d = Discriminator(32, **SMALL)
    real = torch.randn(4, 3, 32, 32, requires_grad=True)
    fake = torch.randn(4, 3, 32, 32)
    real_l = d(real)
    loss = d_logistic_loss(real_l, d(fake)) + r1_penalty(real_l, real)
    loss.backward()
    for name, p in d.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # And to the fake images (the generator's path).
    fake = torch.randn(2, 3, 32, 32, requires_grad=True)
    g_nonsaturating_loss(d(fake)).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_parity(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    d = Discriminator(64, **SMALL)
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    x.requires_grad_(True)
    out = d(x)
    pen = r1_penalty(out, x)
    d_cuda = Discriminator(64, **SMALL).cuda()
    d_cuda.load_state_dict(d.state_dict())
    xc = x.detach().cuda().requires_grad_(True)
    out_c = d_cuda(xc)
    pen_c = r1_penalty(out_c, xc)
    assert torch.allclose(out_c.cpu(), out, rtol=1e-3, atol=1e-4)
    assert torch.allclose(pen_c.cpu(), pen, rtol=1e-3, atol=1e-5)
