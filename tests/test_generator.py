"""Feature-volume generator and sampling (lib/model/generator.py) against float64 references
written here from the documented formulas."""
from __future__ import annotations

import math

import pytest
import torch

from lib.model.generator import AdaIN3d, Generator, sample_volume

f64 = torch.float64


def _lrelu(x, slope=0.01):
    return torch.where(x > 0, x, slope * x)


def _up_matrix(n: int) -> torch.Tensor:
    """[2n, n] linear interpolation with align_corners=True: output i sits at input
    coordinate i (n - 1) / (2n - 1), so the first and last samples coincide."""
    m = torch.zeros(2 * n, n, dtype=f64)
    for i in range(2 * n):
        s = i * (n - 1) / (2 * n - 1) if n > 1 else 0.0
        i0 = min(int(math.floor(s)), n - 1)
        t = s - i0
        m[i, i0] += 1 - t
        if t > 0:
            m[i, i0 + 1] += t
    return m


def _up2(x: torch.Tensor) -> torch.Tensor:
    """Separable trilinear x2 upsampling of [B, Ch, Gz, Gy, Gx] (align_corners=True)."""
    d, h, w = x.shape[2:]
    return torch.einsum("Ii,Jj,Kk,bcijk->bcIJK", _up_matrix(d), _up_matrix(h), _up_matrix(w), x)


def _adain(x, lin, z):
    """x_hat * std + mean, [mean | std] = lin(z), unbiased variance + 1e-5 under the root."""
    a = z @ lin.weight.T + lin.bias
    c = x.shape[1]
    mean, std = a[:, :c], a[:, c:]
    flat = x.flatten(2)
    n = flat.shape[2]
    mu = flat.sum(2) / n
    var = ((flat - mu[..., None]) ** 2).sum(2) / (n - 1)
    x_hat = (x - mu[..., None, None, None]) / (var + 1e-5).sqrt()[..., None, None, None]
    return x_hat * std[..., None, None, None] + mean[..., None, None, None]


def _reference_forward(gen: Generator, z: torch.Tensor) -> torch.Tensor:
    h = gen.const.expand(z.shape[0], -1, -1, -1, -1)
    h = _lrelu(_adain(h, gen.adain0.style, z))
    for i, conv in enumerate(gen.convs):
        h = torch.nn.functional.conv3d(_up2(h), conv.weight, conv.bias, padding=1)
        if i < len(gen.convs) - 1:
            h = _adain(h, gen.adains[i].style, z)
        h = _lrelu(h)
    return h


def test_up_matrix_is_align_corners_true():
    m = _up_matrix(3)  # 3 -> 6: positions 0, 0.4, 0.8, 1.2, 1.6, 2
    assert torch.allclose(m @ torch.tensor([0.0, 1.0, 2.0], dtype=f64),
                          torch.tensor([0.0, 0.4, 0.8, 1.2, 1.6, 2.0], dtype=f64))


def test_adain_statistics_unbiased():
    torch.manual_seed(0)
    ada = AdaIN3d(3, 5).double()
    x = 3.0 * torch.randn(2, 3, 2, 2, 2, dtype=f64) + 1.0  # 8 cells: unbiased/biased = 8/7
    z = torch.randn(2, 5, dtype=f64)
    out = ada(x, z)
    mean, std = ada.style(z).detach().chunk(2, dim=-1)
    flat, x_flat = out.detach().flatten(2), x.flatten(2)
    assert torch.allclose(flat.mean(2), mean, atol=1e-12)
    var_x = x_flat.var(2, unbiased=True)
    # the output's unbiased std is |std| up to the eps: |std| sqrt(var / (var + eps))
    expected = std.abs() * (var_x / (var_x + 1e-5)).sqrt()
    assert torch.allclose(flat.std(2, unbiased=True), expected, rtol=1e-12)
    assert torch.allclose(flat.std(2, unbiased=True), std.abs(), rtol=1e-5)
    # normalizing by the biased variance would give |std| sqrt(8 / 7) instead
    biased = std.abs() * (var_x / (x_flat.var(2, unbiased=False) + 1e-5)).sqrt()
    assert torch.allclose(biased, std.abs() * math.sqrt(8 / 7), rtol=1e-5)
    assert ((flat.std(2, unbiased=True) - biased).abs() > 1e-3 * std.abs()).all()
    assert torch.allclose(out, _adain(x, ada.style, z), atol=1e-12)


def test_adain_linear_default_init():
    torch.manual_seed(0)
    ada = AdaIN3d(64, 256)
    bound = 1.0 / math.sqrt(256)
    for p in (ada.style.weight, ada.style.bias):  # torch's default: U(-1/sqrt(fan_in), +)
        assert p.abs().max() <= bound and p.std() > 0.5 * bound / math.sqrt(3)


def test_forward_matches_float64_reference():
    torch.manual_seed(0)
    gen = Generator(z_dim=6, base_channels=4, base_shape=(2, 3, 2), channels=(3, 5, 2)).double()
    z = torch.randn(3, 6, dtype=f64)
    out = gen(z)
    assert out.shape == (3, 2, 16, 24, 16) and gen.out_shape == (16, 24, 16)
    assert torch.allclose(out, _reference_forward(gen, z), atol=1e-10)
    # align_corners=False upsampling would be a different function
    h = torch.randn(1, 1, 2, 3, 2, dtype=f64)
    wrong = torch.nn.functional.interpolate(
        h, scale_factor=2, mode="trilinear", align_corners=False
    )
    assert (wrong - _up2(h)).abs().max() > 1e-2


@pytest.mark.parametrize("channels", [(8, 4, 4), (8, 4)])
def test_last_stage_has_no_modulation(channels):
    torch.manual_seed(0)
    gen = Generator(z_dim=16, base_channels=8, base_shape=(1, 2, 2), channels=channels)
    assert len(gen.adains) == len(channels) - 1
    keys = set(gen.state_dict())
    assert f"adains.{len(channels) - 2}.style.weight" in keys
    assert f"adains.{len(channels) - 1}.style.weight" not in keys
    last = gen.convs[-1]
    bias = torch.linspace(-2.0, 3.0, channels[-1])
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(bias)
        out = gen(torch.randn(3, 16) * 5)
    # a modulated last stage would return mean(z) per item; unmodulated it is lrelu(bias)
    assert torch.allclose(out, _lrelu(bias)[None, :, None, None, None].expand_as(out))


def test_default_layout_and_init():
    torch.manual_seed(0)
    gen = Generator()
    shapes = {k: tuple(v.shape) for k, v in gen.state_dict().items()}
    assert shapes == {
        "const": (1, 256, 2, 8, 8),
        "adain0.style.weight": (512, 256), "adain0.style.bias": (512,),
        "convs.0.weight": (128, 256, 3, 3, 3), "convs.0.bias": (128,),
        "adains.0.style.weight": (256, 256), "adains.0.style.bias": (256,),
        "convs.1.weight": (64, 128, 3, 3, 3), "convs.1.bias": (64,),
        "adains.1.style.weight": (128, 256), "adains.1.style.bias": (128,),
        "convs.2.weight": (64, 64, 3, 3, 3), "convs.2.bias": (64,),
    }
    assert abs(gen.const.std().item() - 0.002) < 1e-4 and abs(gen.const.mean().item()) < 1e-4


def test_sample_volume_zero_padding_and_trilinear():
    torch.manual_seed(0)
    Ch, Gz, Gy, Gx = 2, 3, 4, 5
    vol = torch.randn(1, Ch, Gz, Gy, Gx, dtype=f64)
    lo, hi = torch.tensor([-0.6, -1.0, 0.2], dtype=f64), torch.tensor([0.9, 1.0, 1.0], dtype=f64)

    def reference(p):
        # continuous lattice coordinates: lo -> 0, hi -> n - 1 on each axis (x->Gx, y->Gy, z->Gz)
        u = [(p[a] - lo[a]) / (hi[a] - lo[a]) * (n - 1) for a, n in ((0, Gx), (1, Gy), (2, Gz))]
        base = [math.floor(v) for v in u]
        val = torch.zeros(Ch, dtype=f64)
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    ix, iy, iz = base[0] + dx, base[1] + dy, base[2] + dz
                    wgt = ((u[0] - base[0]) if dx else (1 - (u[0] - base[0]))) * \
                          ((u[1] - base[1]) if dy else (1 - (u[1] - base[1]))) * \
                          ((u[2] - base[2]) if dz else (1 - (u[2] - base[2])))
                    if 0 <= ix < Gx and 0 <= iy < Gy and 0 <= iz < Gz:  # zero padding
                        val += wgt * vol[0, :, iz, iy, ix]
        return val

    inside = lo + (hi - lo) * torch.rand(40, 3, dtype=f64)
    cell = (hi - lo) / torch.tensor([Gx - 1, Gy - 1, Gz - 1], dtype=f64)
    near = torch.stack([hi + 0.5 * cell, lo - 0.3 * cell])         # within one cell outside
    far = torch.stack([hi + 1.5 * cell, lo - torch.tensor([5.0, 0.0, 0.0], dtype=f64),
                       torch.tensor([0.0, 0.0, 7.0], dtype=f64)])  # beyond one cell
    pts = torch.cat([inside, near, far])[None]                     # [1, 45, 3]
    got = sample_volume(vol, pts, lo, hi)
    assert got.shape == (1, 45, Ch)
    ref = torch.stack([reference(p) for p in pts[0]])
    assert torch.allclose(got[0], ref, atol=1e-12)
    assert torch.count_nonzero(got[0, -3:]) == 0
    assert (got[0, 40:42].abs() > 1e-6).all()  # partial weights just outside the faces
    # a lattice corner returns its cell value exactly
    corner = torch.stack([lo, hi])[None]
    assert torch.allclose(sample_volume(vol, corner, lo, hi)[0],
                          torch.stack([vol[0, :, 0, 0, 0], vol[0, :, -1, -1, -1]]), atol=1e-12)
