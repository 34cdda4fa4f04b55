"""Tests of lib/model/embedder.py, networks.py and generator.py (shapes, init, sampling, grads)."""
import math

import pytest
import torch
import torch.nn.functional as F

from lib.model.embedder import PositionalEncoding
from lib.model.generator import Generator, sample_volume
from lib.model.networks import (
    ImplicitNetwork,
    LBSNetwork,
    build_displacement_network,
    build_geometry_network,
    build_head_networks,
    build_normal_network,
    build_texture_network,
)


def _small_generator(**kw):
    return Generator(z_dim=16, base_channels=8, base_shape=(1, 2, 2), channels=(8, 4, 4), **kw)


# ---------------------------------------------------------------- positional encoding
def test_positional_encoding_dims_and_values():
    assert PositionalEncoding(3, 4).out_dim == 27
    assert PositionalEncoding(3, 6).out_dim == 39
    ident = PositionalEncoding(3, 0)
    x = torch.randn(2, 5, 3)
    assert ident.out_dim == 3 and torch.equal(ident(x), x)
    enc = PositionalEncoding(3, 4)(x)
    xd = x.double()
    ref = [xd]  # include_input, then log-sampled 2^0..2^(L-1), sin then cos per frequency
    for f in 2.0 ** torch.linspace(0.0, 3.0, 4, dtype=torch.float64):
        ref += [torch.sin(f * xd), torch.cos(f * xd)]
    assert torch.allclose(enc.double(), torch.cat(ref, -1), atol=1e-5)
    with pytest.raises(ValueError, match="embedder.py"):
        PositionalEncoding(3, 4)(torch.randn(2, 5, 2))


# ---------------------------------------------------------------- derived dimensions
def test_derived_dimensions():
    nets = build_head_networks()
    geo, normal, texture = nets["geometry"], nets["normal"], nets["texture"]
    assert geo.embed_dim == 27 and normal.embed_dim == 39
    assert geo.feature_dim == 229 == 256 - 27
    assert normal.cond_dim == 128 + 229
    assert normal.feature_dim == 256
    assert texture.cond_dim == 64 + 65 + 229 + 256 == 614
    assert nets["lbs"].blendshape_dim == 36 * 3 + 3 * 50 == 258
    x = torch.rand(2, 7, 3) * 2 - 1
    out, feat = geo(x, torch.randn(2, 64), return_features=True)
    assert out.shape == (2, 7, 1) and feat.shape == (2, 7, 229)
    n, nfeat = normal(
        x, torch.cat([torch.randn(2, 7, 128), feat], -1).detach(), return_features=True
    )
    assert n.shape == (2, 7, 3) and nfeat.shape == (2, 7, 256)
    assert torch.allclose(n.norm(dim=-1), torch.ones(2, 7), atol=1e-5)
    cond = torch.cat([torch.randn(2, 7, 129), feat, nfeat], -1)
    rgb = texture(x, cond)
    assert rgb.shape == (2, 7, 3)


def test_forward_matches_manual_reference():
    """A float64 re-derivation of the wiring: encoding, cond at 0, skip / sqrt(2), softplus(100)."""
    torch.manual_seed(0)
    net = ImplicitNetwork(
        d_out=2, width=32, depth=4, skip_layer=2, multires=2, cond_dim=5, cond_layers=[0, 3]
    )
    x, c = torch.randn(3, 4, 3), torch.randn(3, 5)
    W = [lin.weight.detach().double() for lin in net.layers]
    b = [lin.bias.detach().double() for lin in net.layers]
    emb = net.embedder(x).double()
    cc = c.double()[:, None].expand(-1, 4, -1)
    h = torch.cat([emb, cc], -1) @ W[0].T + b[0]
    h = F.softplus(h, beta=100)
    h = F.softplus(h @ W[1].T + b[1], beta=100)
    assert h.shape[-1] == 32 - emb.shape[-1]  # room for the skip
    h = F.softplus((torch.cat([h, emb], -1) / math.sqrt(2)) @ W[2].T + b[2], beta=100)
    h = F.softplus(torch.cat([h, cc], -1) @ W[3].T + b[3], beta=100)
    ref = h @ W[4].T + b[4]
    assert torch.allclose(net(x, c).double(), ref, atol=1e-5)
    assert torch.allclose(net(x, c[:, None].expand(-1, 4, -1)), net(x, c), atol=1e-6)
    with pytest.raises(ValueError, match="networks.py"):
        net(x, None)
    with pytest.raises(ValueError, match="networks.py"):
        net(x, torch.randn(3, 6))
    with pytest.raises(ValueError, match="networks.py"):
        net(x, torch.randn(5))


# ---------------------------------------------------------------- geometric init
def test_geometric_init_columns_of_the_geometry_network():
    """Layer 0 [27 encoding | 64 volume feature]: xyz and feature columns ~ N(0, 2 / 256),
    sinusoid columns zero; hidden layers N(0, 2 / fan_out), bias 0; the output layer (the skip
    enters it) N(-sqrt(pi / 256), 1e-4) on all 256 inputs (229 hidden + 27 encoding), bias 1."""
    torch.manual_seed(0)
    net = build_geometry_network()
    W = [lin.weight.detach() for lin in net.layers]
    assert [tuple(w.shape) for w in W] == [(256, 91), (256, 256), (256, 256), (229, 256), (1, 256)]
    std0 = math.sqrt(2.0) / math.sqrt(256)
    assert torch.count_nonzero(W[0][:, 3:27]) == 0
    for cols, rel in ((W[0][:, :3], 0.1), (W[0][:, 27:], 0.05)):
        assert abs(cols.std().item() / std0 - 1.0) < rel
        assert abs(cols.mean().item()) < 4 * std0 / math.sqrt(cols.numel())
    for w in W[1:4]:
        assert abs(w.std().item() / (math.sqrt(2.0) / math.sqrt(w.shape[0])) - 1.0) < 0.02
    for lin in net.layers[:4]:
        assert torch.count_nonzero(lin.bias) == 0
    assert (W[4] - (-math.sqrt(math.pi) / 16.0)).abs().max() < 1e-3  # no zeroed column
    assert net.layers[4].bias.item() == 1.0
    # a skip into a hidden layer zeroes the sinusoids of the re-fed encoding there
    hidden_skip = ImplicitNetwork(
        width=64, depth=4, multires=4, skip_layer=2, cond_dim=8, geometric_init=True
    )
    w2 = hidden_skip.layers[2].weight.detach()  # [64, 37 hidden | 27 encoding]
    assert torch.count_nonzero(w2[:, 37 + 3:]) == 0
    assert torch.count_nonzero(w2[:, :37 + 3]) == w2[:, :40].numel()


def _seed_mean_output(make, pts, n_seeds=6):
    """Mean over nets of seeds 0..n_seeds-1 of out(pts) with a zero condition, float64."""
    outs = []
    for seed in range(n_seeds):
        torch.manual_seed(seed)
        net = make().double()
        with torch.no_grad():
            outs.append(net(pts, torch.zeros(1, net.cond_dim, dtype=torch.float64))[0, :, 0])
    return torch.stack(outs).mean(0), net


def _directions(n=100, seed=7):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=-1)


def test_geometric_init_is_a_sphere_when_the_skip_is_hidden():
    """IDR's property: on average over weights and directions out(x) ~= bias - |x| (the rippling
    single nets differ from it by about 0.1-0.3 of the radius; softplus adds a small offset)."""
    dirs, rs = _directions(), torch.tensor([0.5, 0.75, 1.0, 1.5], dtype=torch.float64)
    pts = (rs[:, None, None] * dirs[None]).reshape(1, -1, 3)
    mean, _ = _seed_mean_output(lambda: ImplicitNetwork(width=256, depth=4, multires=4,
                                                        skip_layer=2, cond_dim=64,
                                                        geometric_init=True, bias=1.0), pts)
    per_radius = mean.reshape(len(rs), -1).mean(1)
    assert ((per_radius - (1.0 - rs)).abs() < 0.08).all(), per_radius


def test_geometry_network_init_follows_the_skip_into_the_output_layer():
    """The geometry network's skip enters its output layer, so on average over weights
    out(x) ~= 1 - sqrt(229 / 512) |x| - sqrt(pi / 512) * sum(embed(x)) (module docstring),
    direction by direction; it is not the sphere 1 - |x|."""
    dirs, rs = _directions(), torch.tensor([0.5, 0.75, 1.0], dtype=torch.float64)
    pts = (rs[:, None, None] * dirs[None]).reshape(1, -1, 3)
    mean, net = _seed_mean_output(build_geometry_network, pts)
    mean = mean.reshape(len(rs), -1)
    ref = (1.0 - math.sqrt(229 / 512) * rs[:, None]
           - math.sqrt(math.pi / 512) * net.embedder(pts).reshape(len(rs), -1, 27).sum(-1))
    assert ((mean - ref).abs().mean(1) < 0.06).all(), (mean - ref).abs().mean(1)
    assert ((mean - (1.0 - rs[:, None])).abs().mean(1) > 0.2).all()  # the formula is what tells
    with torch.no_grad():
        origin = [
            build_geometry_network()(torch.zeros(1, 1, 3), torch.zeros(1, 64)).item()
            for _ in range(3)
        ]
    assert all(-0.3 < v < 0.1 for v in origin), origin  # the centre starts (just) outside


# ---------------------------------------------------------------- LBS network
def test_lbs_zero_blendshapes_and_softmax_weights():
    torch.manual_seed(0)
    lbs = LBSNetwork()
    xc = torch.rand(2, 50, 3) * 2 - 1
    w, pose_dirs, expr_dirs, logits = lbs(xc, return_logits=True)
    assert w.shape == (2, 50, 5) and pose_dirs.shape == (2, 50, 36, 3)
    assert expr_dirs.shape == (2, 50, 3, 50)
    assert torch.count_nonzero(pose_dirs) == 0 and torch.count_nonzero(expr_dirs) == 0
    assert torch.allclose(w, torch.softmax(20.0 * logits, -1))
    assert torch.allclose(w.sum(-1), torch.ones(2, 50), atol=1e-6)
    small = LBSNetwork(n_joints=3, pose_feature_dim=18, n_exp=10)
    w, p, e = small(xc)
    assert w.shape == (2, 50, 3) and p.shape == (2, 50, 18, 3) and e.shape == (2, 50, 3, 10)


def test_displacement_default_init_is_nonzero():
    """torch's default Linear init on every layer (weight-normed output included): dx != 0."""
    torch.manual_seed(0)
    net = build_displacement_network()
    dx = net(torch.randn(2, 30, 3), torch.randn(2, 100))
    assert dx.shape == (2, 30, 3) and (dx.abs() > 1e-6).all()
    assert (dx[:, 1:] - dx[:, :1]).abs().max() > 1e-4  # depends on the point


@pytest.mark.parametrize("which", ["displacement", "normal", "texture"])
def test_non_geometric_networks_use_default_linear_init(which):
    """Kaiming-uniform weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (std 1/sqrt(3 fan_in)) and
    bias in the same range, on every layer including the condition columns."""
    torch.manual_seed(0)
    net = {"displacement": build_displacement_network, "normal": build_normal_network,
           "texture": build_texture_network}[which]()
    for lin in net.layers:
        w, b = lin.weight.detach(), lin.bias.detach()
        bound = 1.0 / math.sqrt(w.shape[1])
        assert w.abs().max() <= bound * (1 + 1e-5) and b.abs().max() <= bound * (1 + 1e-5)
        if w.numel() > 1000:
            assert abs(w.std().item() * math.sqrt(3 * w.shape[1]) - 1.0) < 0.05
    cond_w = net.layers[0].weight[:, -net.cond_dim:]
    assert torch.count_nonzero(cond_w) == cond_w.numel()


def test_texture_output_is_linear():
    """rgb is the last Linear's output itself: no squashing, so it leaves [-1, 1] when that
    layer says so."""
    torch.manual_seed(0)
    net = build_texture_network(
        color_dim=4, pose_exp_dim=5, geometry_feature_dim=6, normal_feature_dim=7, width=64
    )
    seen = []
    net.layers[-1].register_forward_hook(lambda mod, inp, out: seen.append(out))
    x, c = torch.rand(2, 9, 3) * 2 - 1, torch.randn(2, 9, 22)
    with torch.no_grad():
        net.layers[-1].bias.copy_(torch.tensor([3.0, -3.0, 0.0]))
        rgb = net(x, c)
    assert torch.equal(rgb, seen[-1])
    assert rgb[..., 0].min() > 1.0 and rgb[..., 1].max() < -1.0


@pytest.mark.parametrize("which", ["geometry", "displacement", "normal", "texture"])
def test_state_dict_layout_is_weight_normed_layers(which):
    """Every layer l of the MLP: layers.{l}.bias [out], layers.{l}.parametrizations.weight.
    original0 (g, [out, 1]) and .original1 (v, [out, in]); weight = g * v / |v| per row."""
    net = {"geometry": build_geometry_network, "displacement": build_displacement_network,
           "normal": build_normal_network, "texture": build_texture_network}[which]()
    sd = net.state_dict()
    expected = set()
    for l, lin in enumerate(net.layers):
        p = f"layers.{l}."
        expected |= {p + "bias", p + "parametrizations.weight.original0",
                     p + "parametrizations.weight.original1"}
        g = sd[p + "parametrizations.weight.original0"]
        v = sd[p + "parametrizations.weight.original1"]
        assert g.shape == (lin.out_features, 1) and v.shape == (lin.out_features, lin.in_features)
        torch.testing.assert_close(lin.weight, g * v / v.norm(dim=1, keepdim=True))
    assert set(sd) == expected
    assert len(net.layers) == {"geometry": 5, "displacement": 5, "normal": 9, "texture": 9}[which]


# ---------------------------------------------------------------- conditioning
def test_geometry_condition_acts_at_init():
    """The volume-feature columns of layer 0 are random at init: the condition moves the output."""
    torch.manual_seed(0)
    net = build_geometry_network()
    x = torch.rand(2, 40, 3) * 2 - 1
    c1, c2 = torch.randn(2, 64), torch.randn(2, 64)
    with torch.no_grad():
        assert (net(x, c1) - net(x, c2)).abs().max() > 1e-2


# ---------------------------------------------------------------- generator and sampling
def test_generator_shape_and_style():
    torch.manual_seed(0)
    gen = Generator()
    assert gen.out_channels == 64 and gen.out_shape == (16, 64, 64)
    with torch.no_grad():
        vol = gen(torch.randn(2, 256))
    assert vol.shape == (2, 64, 16, 64, 64) and torch.isfinite(vol).all()
    assert (vol[0] - vol[1]).abs().mean() > 1e-2 * vol.abs().mean()
    feats = gen.sample(vol, torch.rand(2, 10, 3) * 2 - 1)
    assert feats.shape == (2, 10, 64)


def test_sample_volume_reproduces_linear_field():
    Gz, Gy, Gx = 5, 7, 9  # distinct sizes catch an axis mix-up
    lo, hi = torch.tensor([-0.8, -1.2, -0.5]), torch.tensor([0.9, 1.1, 0.4])
    zs, ys, xs = (torch.linspace(float(lo[i]), float(hi[i]), n)
                  for i, n in ((2, Gz), (1, Gy), (0, Gx)))
    zz, yy, xx = torch.meshgrid(zs, ys, xs, indexing="ij")
    vol = torch.stack([xx, yy, zz])[None].double()  # [1, 3, Gz, Gy, Gx], channels = (x, y, z)
    pts = (lo + (hi - lo) * torch.rand(3, 100, 3)).double()
    got = sample_volume(vol, pts, lo, hi)  # the volume is shared by the 3 batches
    assert got.shape == (3, 100, 3)
    assert (got - pts).abs().max() < 1e-5
    outside = torch.tensor([[[5.0, -5.0, 0.0]]], dtype=torch.float64)
    zero = sample_volume(vol, outside, lo.tolist(), hi.tolist())  # zero padding
    assert torch.equal(zero, torch.zeros(1, 1, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="generator.py"):
        sample_volume(vol, pts, hi, lo)


# ---------------------------------------------------------------- gradients
def _assert_all_grads(module, name):
    for pname, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname} got no gradient"


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    gen = _small_generator()
    geo = build_geometry_network(feature_dim=gen.out_channels, width=64, depth=4, multires=4)
    lbs = LBSNetwork(width=32)
    normal = build_normal_network(detail_dim=8, geometry_feature_dim=geo.feature_dim, width=64)
    texture = build_texture_network(color_dim=4, pose_exp_dim=5,
                                    geometry_feature_dim=geo.feature_dim,
                                    normal_feature_dim=normal.feature_dim, width=64)
    z = torch.randn(2, 16)
    xc = torch.rand(2, 20, 3) * 2 - 1
    occ, gfeat = geo(xc, gen.sample(gen(z), xc), return_features=True)
    w, pd, ed = lbs(xc)
    n, nfeat = normal(xc, torch.cat([torch.randn(2, 20, 8), gfeat], -1), return_features=True)
    rgb = texture(xc, torch.cat([torch.randn(2, 20, 9), gfeat, nfeat], -1))
    loss = (occ.square().mean() + (w * torch.randn_like(w)).sum() + pd.sum() + ed.sum()
            + n.sum() + rgb.sum())
    loss.backward()
    for m, name in ((gen, "generator"), (geo, "geometry"), (lbs, "lbs"), (normal, "normal"),
                    (texture, "texture")):
        _assert_all_grads(m, name)


def test_displacement_trains():
    torch.manual_seed(0)
    net = build_displacement_network(width=32)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, beta, target = torch.randn(2, 30, 3), torch.randn(2, 100), torch.randn(2, 30, 3)
    for _ in range(2):
        opt.zero_grad()
        (net(x, beta) - target).square().mean().backward()
        opt.step()
    _assert_all_grads(net, "displacement")


# ---------------------------------------------------------------- device parity
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_parity():
    torch.manual_seed(0)
    gen = _small_generator()
    nets = build_head_networks(volume_feature_dim=gen.out_channels)
    z, xc = torch.randn(2, 16), torch.rand(2, 64, 3) * 2 - 1
    cpu_occ = nets["geometry"](xc, gen.sample(gen(z), xc))
    cpu_w = nets["lbs"](xc)[0]
    dev = torch.device("cuda")
    old_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions would differ by ~1e-3
    try:
        gen_c, nets_c = gen.to(dev), nets.to(dev)
        occ = nets_c["geometry"](xc.to(dev), gen_c.sample(gen_c(z.to(dev)), xc.to(dev)))
        w = nets_c["lbs"](xc.to(dev))[0]
    finally:
        torch.backends.cudnn.allow_tf32 = old_tf32
    assert torch.allclose(occ.cpu(), cpu_occ, atol=1e-4)
    assert torch.allclose(w.cpu(), cpu_w, atol=1e-4)


def test_softplus_matches_torch_softplus_float64():
    """lib.model.networks.Softplus (input clamped at -25 / beta) against F.softplus(beta=100) in
    float64: values within exp(-25) / 100 and slopes within sigmoid(-25), over the range where
    torch's kernels take their slow paths and beyond; the in-place form gives the same values."""
    from lib.model.networks import Softplus

    x = torch.linspace(-5.0, 5.0, 200001, dtype=torch.float64).requires_grad_(True)
    ref = F.softplus(x, beta=100)
    out = Softplus(beta=100.0)(x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    (g_out,) = torch.autograd.grad(out.sum(), x)
    assert (out - ref).abs().max() <= math.exp(-25) / 100 * 1.01
    assert (g_out - g_ref).abs().max() <= 1.0 / (1.0 + math.exp(25)) * 1.01
    assert (out - ref).abs().max() > 0  # the clamp is there (a test that could not fail otherwise)
    y = x.detach().clone()
    torch.testing.assert_close(Softplus(beta=100.0)(y, inplace=True), out.detach(), rtol=0, atol=0)
    # its backward is differentiable too (e.g. for gradient penalties)
    z = (torch.rand(40, dtype=torch.float64) * 0.2 - 0.1).requires_grad_(True)
    assert torch.autograd.gradgradcheck(Softplus(beta=100.0), (z,))


def test_per_item_condition_gives_the_per_point_gradients_float64():
    """A [B, cond_dim] condition (folded into a per-item bias) and the same condition repeated
    per point ([B, N, cond_dim], concatenated) give equal outputs and gradients for x, the
    condition and weights."""
    torch.manual_seed(1)
    net = ImplicitNetwork(d_out=2, width=32, depth=4, skip_layer=2, multires=2, cond_dim=5,
                          cond_layers=[0, 3]).double()
    x = torch.randn(3, 6, 3, dtype=torch.float64)

    def run(per_point: bool):
        xg = x.clone().requires_grad_(True)
        c = torch.linspace(-1, 1, 15, dtype=torch.float64).reshape(3, 5).requires_grad_(True)
        out = net(xg, c[:, None].expand(-1, 6, -1) if per_point else c)
        leaves = [xg, c] + list(net.parameters())
        return out.detach(), torch.autograd.grad((out * out).sum(), leaves)

    (o1, g1), (o2, g2) = run(False), run(True)
    torch.testing.assert_close(o1, o2, rtol=0, atol=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
