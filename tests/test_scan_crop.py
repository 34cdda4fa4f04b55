"""Real scans as users have them: the head-region crop, occupancy labels next to holes, the
landmark-free FLAME fit of busts in other units and orientations (lib/inference/crop.py,
latent_fit.occupancy_samples, flame_fit.py, scan.axis_rotations; the bust conditions of
lib/synthetic/bust.py).

Truths: the parts added to a synthetic head (torso, spikes, a loose piece) are known by
construction; a sphere's inside is analytic; rotations are checked against scipy."""
from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def head_scan(head_model_path):
    """A synthetic head scan (FLAME space, neck cut open) with its FLAME parameters."""
    from lib.flame import FLAMEServer
    from lib.synthetic.scans import HeadContext, make_scan, make_style

    ctx = HeadContext.from_path(str(head_model_path))
    rng = np.random.default_rng(3)
    shape = np.zeros(100)
    shape[:10] = rng.normal(0, 1.0, 10)
    style = make_style(1, rng)
    scan = make_scan(ctx, shape, np.zeros(50), np.zeros(15), style, rng, target_faces=8000,
                     texture_size=64)
    server = FLAMEServer(str(head_model_path))
    params = np.zeros(server.full_length, np.float32)
    params[0] = 1.0
    params[19:119] = shape
    return {"verts": scan.vertices, "faces": scan.faces, "server": server,
            "params": torch.from_numpy(params)[None]}


def _flame(head_scan):
    with torch.no_grad():
        out = head_scan["server"](head_scan["params"])
    return out.verts[0], head_scan["server"].flame.faces, out.tfs[0, 0, :3, :3]


def _area(v, f):
    t = v[f]
    return 0.5 * np.linalg.norm(np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]), axis=1)


def test_crop_removes_the_torso_and_keeps_the_head(head_scan):
    from lib.inference.crop import crop_head
    from lib.synthetic.bust import add_torso

    v, f, _, n_head = add_torso(head_scan["verts"], head_scan["faces"])
    cut = crop_head(v, f, *_flame(head_scan))
    area = _area(v, f)
    head, torso = np.arange(len(f)) < n_head, np.arange(len(f)) >= n_head
    assert area[cut.keep & head].sum() > 0.97 * area[head].sum()
    assert area[cut.keep & torso].sum() < 0.05 * area[torso].sum()
    st = cut.stats
    assert st["kept"]["faces"] == int(cut.keep.sum())
    assert st["below_neck"]["area_fraction"] + st["far_from_flame"]["area_fraction"] > 0.5
    # the head alone loses (almost) nothing
    alone = crop_head(head_scan["verts"], head_scan["faces"], *_flame(head_scan))
    a0 = _area(head_scan["verts"], head_scan["faces"])
    assert a0[alone.keep].sum() > 0.97 * a0.sum()


def test_crop_removes_spikes_and_loose_pieces(head_scan):
    from lib.inference.crop import crop_head
    from lib.synthetic.bust import add_spikes

    rng = np.random.default_rng(0)
    v = add_spikes(head_scan["verts"], head_scan["faces"], 10, 0.8, rng)
    moved = np.nonzero(np.linalg.norm(v - head_scan["verts"], axis=1) > 0)[0]
    # a loose piece: two small triangles just off the head's side, within the margin
    fv = _flame(head_scan)[0].numpy()
    side = fv[np.argmax(fv[:, 0])] + [0.03, 0.0, 0.0]
    piece = side + np.array([[0.0, 0, 0], [0, 0.02, 0], [0, 0, 0.02], [0, 0.02, 0.02]])
    f = np.concatenate([head_scan["faces"], len(v) + np.array([[0, 1, 2], [1, 3, 2]])])
    v = np.concatenate([v, piece])
    cut = crop_head(v, f, *_flame(head_scan))
    spiky = np.isin(f, moved).any(1)
    assert not cut.keep[spiky].any()
    assert not cut.keep[-2:].any()
    assert cut.stats["spikes"]["faces"] + cut.stats["far_from_flame"]["faces"] >= spiky.sum()
    assert cut.stats["loose_pieces"]["faces"] >= 2
    assert cut.keep[~spiky][:-2].mean() > 0.99


def test_apply_crop_keeps_the_attributes_of_kept_faces():
    from lib.inference.crop import apply_crop
    from lib.inference.scan import ScanData

    verts = np.arange(18, dtype=np.float64).reshape(6, 3)
    faces = np.array([[0, 1, 2], [2, 3, 4], [3, 4, 5]])
    colors = np.linspace(0, 1, 18).reshape(6, 3)
    scan = ScanData(verts=verts, faces=faces, path="x", vertex_colors=colors,
                    uvs=np.zeros((9, 2)), face_uvs=np.arange(9).reshape(3, 3))
    out = apply_crop(scan, np.array([True, False, True]))
    # the kept faces' corners, by position and colour, are the original ones
    assert np.array_equal(out.verts[out.faces], verts[faces[[0, 2]]])
    assert np.array_equal(out.vertex_colors[out.faces], colors[faces[[0, 2]]])
    assert np.array_equal(out.face_uvs, [[0, 1, 2], [6, 7, 8]])
    assert len(out.verts) == 6 and out.faces.max() == 5


def test_occupancy_points_next_to_a_hole_are_dropped():
    import trimesh

    from lib.inference.latent_fit import occupancy_samples

    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    v, f = np.asarray(sphere.vertices), np.asarray(sphere.faces)
    keep = v[f].mean(1)[:, 1] < 0.4  # a cap cut off the top: a hole of radius ~0.15
    pts = v[f[keep]].mean(1)
    p, occ, st = occupancy_samples(v, f[keep], pts, 4000, 2000, sigmas=(0.02, 0.1),
                                   seed=0, ambiguous=(0.3, 0.7),
                                   plane=(np.array([0.0, -0.45, 0.0]), np.array([0.0, 1.0, 0.0])))
    assert st["ambiguous_winding"] > 0 and st["below_neck"] > 0
    assert st["kept"] == len(p) == len(occ)
    truth = np.linalg.norm(p, axis=1) < 0.5
    assert (occ.astype(bool) == truth).mean() > 0.99
    assert (p[:, 1] > -0.45).all()
    # kept points near the hole are labelled right too
    near = np.linalg.norm(p - [0, 0.5, 0], axis=1) < 0.3
    assert near.sum() > 10 and (occ[near].astype(bool) == truth[near]).mean() > 0.95


def test_axis_rotations():
    from scipy.spatial.transform import Rotation

    from lib.inference.scan import ORIENTATIONS, axis_rotations

    rots = axis_rotations()
    mats = np.stack(list(rots.values()))
    assert len(rots) == 24 and len(np.unique(mats.round(6).reshape(24, -1), axis=0)) == 24
    assert np.allclose(np.linalg.det(mats), 1.0)
    assert np.allclose(mats @ mats.transpose(0, 2, 1), np.eye(3))
    for name, R in ORIENTATIONS.items():
        assert np.array_equal(rots[name], R)
    # the 24 are the rotation group of the cube (scipy's octahedral group), nothing else
    cube = Rotation.create_group("O").as_matrix().round(6) + 0.0  # + 0.0: no negative zeros
    assert {m.tobytes() for m in cube} == {m.tobytes() for m in mats.round(6) + 0.0}



def test_pca_orientations_undo_any_rotation():
    """A cloud with three distinct spreads along x, y, z, turned by random rotations: one of
    the `pca` candidates undoes each rotation (up to sampling noise), while the nearest of
    the 24 axis rotations can be tens of degrees off."""
    from scipy.spatial.transform import Rotation

    from lib.inference.flame_fit import _orientation_set, principal_frame

    rng = np.random.default_rng(3)
    cloud = rng.normal(size=(4000, 3)) * [0.5, 1.0, 0.25]
    for k in range(5):
        R = Rotation.random(random_state=k).as_matrix()
        turned = cloud @ R.T
        E = principal_frame(turned)
        assert np.allclose(E.T @ E, np.eye(3)) and np.linalg.det(E) == pytest.approx(1.0)
        cands = _orientation_set(["any", "pca"], turned)
        assert len(cands) == 48

        def error_deg(Q):  # the angle of Q R (identity when Q undoes R)
            return np.degrees(Rotation.from_matrix(Q @ R).magnitude())

        pca = min(error_deg(Q) for n, Q in cands.items() if n.startswith("pca_"))
        axes = min(error_deg(Q) for n, Q in cands.items() if not n.startswith("pca_"))
        assert pca < 3.0
        if k == 0:
            assert axes > 10.0  # this rotation is far from every axis rotation
    with pytest.raises(ValueError, match="'pca' orientations need the scan's points"):
        _orientation_set(["pca"])

@pytest.mark.slow
@pytest.mark.parametrize("units,torso,holes", [(1000.0 / 6.0, True, True), (1.0 / 6.0, True,
                                                                            False)])
def test_flame_fit_of_a_bust_in_other_units_and_orientation(head_scan, units, torso, holes):
    """A bust (head + torso, holes) in millimetres or metres, turned by a random rotation: the
    FLAME fit's similarity, with the head's rigid motion that FLAME's global and neck rotations
    took over undone (the two are interchangeable: both turn the head), must put the head
    back where it was made. Without the principal-axes candidates the nearest axis rotation
    left the head about half its height off (median)."""
    from lib.inference.flame_fit import fit_flame
    from lib.inference.scan import ScanData, scan_samples
    from lib.synthetic.bust import add_torso, punch_holes, random_rotation, rigid_units

    rng = np.random.default_rng(5)
    v, f = head_scan["verts"], head_scan["faces"]
    n_head = len(f)
    if torso:
        v, f, _, n_head = add_torso(v, f)
    keep = punch_holes(v, f, 5, 0.06, rng, among=np.unique(f[:n_head])) if holes else \
        np.ones(len(f), bool)
    R = random_rotation(rng)
    raw = rigid_units(v, units, R, rng.uniform(-1, 1, 3) * units)
    samples = scan_samples(ScanData(verts=raw, faces=f[keep], path="bust"), 6000, 0)
    ff = fit_flame(head_scan["server"], samples["points"], ("any", "pca"), n_points=1500,
                   screen_points=300, screen_steps=20, rigid_steps=60, full_steps=60)
    head_ids = np.unique(head_scan["faces"])
    with torch.no_grad():
        A = head_scan["server"](ff.params[None].float()).tfs[0, 1].double().numpy()
    back = (ff.transform.apply(raw[head_ids]) - A[:3, 3]) @ A[:3, :3]  # the neck joint undone
    height = float(np.ptp(head_scan["verts"][:, 1]))
    err = np.linalg.norm(back - head_scan["verts"][head_ids], axis=1)
    assert ff.transform.scale == pytest.approx(1.0 / units, rel=0.1)
    assert np.median(err) < 0.06 * height
    assert any(c["head_fraction"] < 1.0 for c in ff.candidates)
