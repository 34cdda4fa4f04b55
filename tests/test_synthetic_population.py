"""The synthetic population: identity spread, hair styles, the OOD set, determinism, scaling.

Independent truths: the chi-square distribution of the leading identity radius (scipy),
the configured spread, the style lists, exact file equality across runs, and point-to-mesh
distances to the posed head model (libigl) for the new hair geometry.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import chi2

from lib.synthetic.hair import HAIR_STYLES
from lib.synthetic.population import (
    LEADING,
    N_SHAPE,
    OOD_RADIUS,
    TRAIN_QUANTILE,
    Population,
    draw_person,
    draw_shape,
    leading_radius,
)

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "tools"))


# ----------------------------------------------------------------------------- identities
@pytest.mark.parametrize("spread", [1.0, 0.5])
def test_identity_spread_matches_the_configured_one(spread):
    rng = np.random.default_rng(0)
    z = np.stack([draw_shape(rng, spread) for _ in range(4000)])
    assert z.shape == (4000, N_SHAPE)
    # every coefficient has std `spread` (the sample std of 4000 draws is within ~1.1 %);
    # the leading ones too, despite their truncation
    std = z.std(0)
    assert np.abs(std / spread - 1).max() < 0.06, std / spread
    assert abs(std[:LEADING].mean() / spread - 1) < 0.015
    assert abs(std[LEADING:].mean() / spread - 1) < 0.015
    assert np.abs(z.mean(0)).max() < 0.08 * spread
    # the tails are there: single coefficients beyond 3.5 sd, the truncated radius
    # distribution follows chi-square up to the 99th percentile
    assert (np.abs(z) > 3.5 * spread).any()
    lead2 = (z[:, :LEADING] ** 2).sum(1)
    scale2 = lead2.mean() / LEADING  # the rescale that restores unit variance
    for q in (0.25, 0.5, 0.9, 0.98):
        frac = (lead2 / scale2 <= chi2.ppf(q, LEADING)).mean()
        assert abs(frac - q / TRAIN_QUANTILE) < 0.03, (q, frac)
    r = leading_radius(z, spread)
    assert r.max() <= 1.0 + 1e-9 and r.max() > 0.9


def test_ood_identities_lie_beyond_every_training_one():
    ood = np.stack([draw_person(7, p, ood=True)["shape"] for p in range(1, 41)])
    train = np.stack([draw_person(7, p)["shape"] for p in range(1, 41)])
    r_ood, r_train = leading_radius(ood), leading_radius(train)
    assert r_train.max() <= 1.0
    assert r_ood.min() >= OOD_RADIUS[0] - 1e-5 and r_ood.max() <= OOD_RADIUS[1] + 1e-5
    # the other coefficients keep the training distribution
    assert 0.8 < ood[:, LEADING:].std() < 1.2


# ----------------------------------------------------------------------------- looks
def test_every_training_style_in_every_block_and_the_ood_style_never():
    pop = Population()
    styles = pop.train_styles
    assert "bald" in styles and pop.ood_hair not in styles
    assert set(styles) | {pop.ood_hair} == set(HAIR_STYLES)
    n = len(styles)
    hair = [draw_person(3, p)["style"]["hair"] for p in range(1, 4 * n + 1)]
    for b in range(4):  # every block of n consecutive persons has every style once
        assert sorted(hair[b * n:(b + 1) * n]) == sorted(styles)
    assert hair[:n] != hair[n:2 * n]  # in a seeded order, not a fixed cycle
    assert all(draw_person(3, p, ood=True)["style"]["hair"] == pop.ood_hair
               for p in range(1, 6))
    other = Population(ood_hair="bun")
    assert "bun" not in {draw_person(3, p, other)["style"]["hair"] for p in range(1, 3 * n)}
    with pytest.raises(ValueError, match="ood_hair"):
        Population(ood_hair="dreadlocks")


def test_looks_vary_across_the_population():
    people = [draw_person(0, p) for p in range(1, 201)]
    skin = np.stack([q["style"]["skin"] for q in people])
    hair = np.stack([q["style"]["hair_color"] for q in people])
    assert skin.mean(1).max() - skin.mean(1).min() > 0.4  # light to dark skin
    assert len({tuple(np.round(c, 3)) for c in hair}) == 200
    assert 0.2 < np.mean([q["style"]["beard"] > 0 for q in people]) < 0.5
    expr = np.array([q["expressiveness"] for q in people])
    assert expr.min() >= 0.6 and expr.max() <= 1.4 and expr.std() > 0.15
    # bald and receding heads are older on average
    age = np.array([q["age"] for q in people])
    old = np.array([q["style"]["hair"] in ("bald", "receding") for q in people])
    assert age[old].mean() > age[~old].mean() + 0.1


def test_persons_are_a_function_of_seed_and_number():
    a, b = draw_person(5, 12), draw_person(5, 12)
    assert np.array_equal(a["shape"], b["shape"]) and a["style"]["seed"] == b["style"]["seed"]
    np.testing.assert_array_equal(a["style"]["skin"], b["style"]["skin"])
    assert not np.array_equal(a["shape"], draw_person(6, 12)["shape"])
    assert not np.array_equal(a["shape"], draw_person(5, 12, ood=True)["shape"])
    with pytest.raises(ValueError, match="start at 1"):
        draw_person(5, 0)


# ----------------------------------------------------------------------------- generator
KW = {"faces": 3000, "frames": 5, "texture_size": 32, "progress": False}


@pytest.mark.slow
def test_identities_scale_and_ood_written_apart(tmp_path, head_model_path):
    import shutil

    ms = _tool("make_synthetic")
    for run in ("a", "b"):  # the session's head model (a present model is kept)
        (tmp_path / run / "flame").mkdir(parents=True)
        shutil.copy(head_model_path, tmp_path / run / "flame" / "generic_model.pkl")
    a = ms.generate(tmp_path / "a", identities=3, expressions=1, seed=2, ood=2,
                    ood_expressions=2, **KW)
    assert a["made"] == 7
    assert sorted(p.name for p in (tmp_path / "a" / "faceverse_dataset").iterdir()) == \
        ["001_01", "002_01", "003_01"]
    ood = tmp_path / "a" / "ood"
    assert sorted(p.name for p in (ood / "faceverse_dataset").iterdir()) == \
        ["901_01", "901_02", "902_01", "902_02"]
    assert len(list((ood / "flame_params").glob("*_flame.pkl"))) == 4
    # OOD identities in the written parameters: beyond every training person
    from lib.dataset.faceverse_io import load_flame_params

    betas = lambda root, sid: load_flame_params(root / "flame_params" / f"{sid}_flame.pkl")[  # noqa: E731
        "betas"][:N_SHAPE]
    assert leading_radius(betas(ood, "901_01")) > OOD_RADIUS[0] - 1e-4
    assert all(leading_radius(betas(tmp_path / "a", f"00{p}_01")) <= 1.0 for p in (1, 2, 3))
    # fewer identities: the same first persons, byte for byte; the OOD set depends on its
    # own seed only
    ms.generate(tmp_path / "b", identities=2, expressions=1, seed=2, ood=1, **KW)
    for rel in ("faceverse_dataset/002_01/002_01.obj", "flame_params/002_01_flame.pkl",
                "ood/faceverse_dataset/901_01/901_01.obj", "ood/flame_params/901_01_flame.pkl"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    c = ms.plan_scans(tmp_path / "c", identities=1, expressions=1, seed=2, ood=1, ood_seed=99)
    assert not np.array_equal(c[1]["person"]["shape"], a["plan"][3]["person"]["shape"])
    with pytest.raises(ValueError, match="below 901"):
        ms.plan_scans(tmp_path, identities=900, expressions=1, holdout=1, ood=1)


def test_cli_documents_and_checks_the_population_flags(capsys):
    ms = _tool("make_synthetic")
    with pytest.raises(SystemExit):
        ms.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--identities", "--ood", "--ood-hair", "--ood-seed", "--spread", "--preview",
                 "<out>/ood/"):
        assert flag in text, flag
    for bad in (["--ood", "-1"], ["--spread", "0"], ["--ood-hair", "dreadlocks"]):
        with pytest.raises(SystemExit):
            ms.main(["--out", "/nonexistent/never", *bad])


# ----------------------------------------------------------------------------- hair geometry
@pytest.fixture(scope="module")
def styled(head_model_path):
    """One small scan per new hair style on the same neutral head, with the posed model."""
    import igl

    from lib.synthetic.scans import HeadContext, make_scan

    ctx = HeadContext.from_path(head_model_path)
    person = draw_person(1, 1)
    shape, exp, pose = np.zeros(N_SHAPE), np.zeros(50), np.zeros(15)
    import torch

    with torch.no_grad():
        out = ctx.flame(torch.zeros(1, N_SHAPE), torch.zeros(1, 50), torch.zeros(1, 15))
    mv = out.vertices[0].double().numpy()
    scans = {}
    for hair in ("ponytail", "mohawk", "long", "receding", "bald"):
        style = {**person["style"], "hair": hair, "hair_scale": 1.0}
        scan = make_scan(ctx, shape, exp, pose, style, np.random.default_rng(0),
                         target_faces=4000, texture_size=32)
        d2, _, _ = igl.point_mesh_squared_distance(scan.vertices, mv, ctx.faces)
        scans[hair] = (scan.vertices, np.sqrt(d2))
    return {"model": mv, "scans": scans, "size": float(np.ptp(mv, axis=0).max())}


def test_new_hair_styles_put_hair_where_designed(styled):
    mv, size = styled["model"], styled["size"]
    top_y = mv[:, 1].max()
    far = {k: (v[d > 0.02 * size], d) for k, (v, d) in styled["scans"].items()}
    assert len(far["bald"][0]) == 0  # no hair volume at all
    # mohawk: hair only on a strip along the midline, tall on top
    v, d = styled["scans"]["mohawk"]
    assert len(far["mohawk"][0]) > 50
    assert np.abs(far["mohawk"][0][:, 0]).max() < 0.3 * np.ptp(mv[:, 0])
    assert d[v[:, 1] > top_y - 0.05 * size].max() > 0.12 * size
    # ponytail: hair far off the skin behind the head, reaching below the crown's middle
    pt = far["ponytail"][0]
    behind = pt[pt[:, 2] < mv[:, 2].min() + 0.1 * size]
    assert len(behind) > 20 and styled["scans"]["ponytail"][1].max() > 0.1 * size
    # long: hair over the back of the neck, below where the scalp ends
    lo = far["long"][0]
    neck_y = np.percentile(mv[:, 1], 25)
    low, neck = lo[lo[:, 1] < neck_y], mv[mv[:, 1] < neck_y]
    assert len(low) > 20
    assert (low[:, 2] < 0.5 * (neck[:, 2].min() + neck[:, 2].max())).mean() > 0.9  # behind
    # receding: less hair volume than the same person with long hair, none at the brow
    assert len(far["receding"][0]) < len(lo)


# ----------------------------------------------------------------------------- diversity
def test_diversity_by_hand():
    from lib.utils.diversity import chamfer_l1, cross_chamfer, diversity, mesh_points, nearest

    a = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    b = np.array([[0.0, 0.0, 1.0]])
    c = np.array([[0.0, 0.0, 3.0]])
    ab = 0.5 * ((1.0 + np.sqrt(2.0)) / 2 + 1.0)
    ac = 0.5 * ((3.0 + np.sqrt(10.0)) / 2 + 3.0)
    assert chamfer_l1(a, b) == pytest.approx(ab) and chamfer_l1(b, a) == pytest.approx(ab)
    d = diversity([a, b, c])
    assert d["meshes"] == 3 and d["mean"] == pytest.approx((ab + ac + 2.0) / 3)
    assert d["min"] == pytest.approx(ab) and d["max"] == pytest.approx(ac)
    np.testing.assert_allclose(cross_chamfer([b, c], [a]), [[ab], [ac]])
    assert nearest([c], [a, b])["mean"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least 2"):
        diversity([a])
    # area-uniform samples of a unit cube's surface, cut at y = 0.75: the top face (area 1)
    # and a quarter of the four sides (area 1): half of the 6-unit area is 1/3 of the samples
    import trimesh

    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    full = mesh_points(box.vertices + 0.5, box.faces, 30000, seed=1)
    cut = mesh_points(box.vertices + 0.5, box.faces, 30000, seed=1, min_y=0.75)
    assert cut[:, 1].min() >= 0.75 and len(full) == 30000
    assert abs(len(cut) / len(full) - 2.0 / 6.0) < 0.015
