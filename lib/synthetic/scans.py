"""Synthetic textured head scans in FaceVerse's layout and convention (docs/design.md,
Synthetic stand-ins).

Shape legend: V model vertices, F faces, N points (also the vertices of a scan mesh), M
samples beside them, U uv coordinates, Ht/Wt texture rows/columns, Ch channels.

A scan is built in the head's own frame (the root joint's frame: y up, z forward):

1. pose the head model with FLAME (shape, expression, pose) and move it into the root frame;
2. an implicit field: exact signed distance to the posed skin, minus a hair thickness on
   the scalp (see :mod:`lib.synthetic.hair`), plus small skin bumps and forehead wrinkles,
   unioned with the eyeballs (the model's other connected components);
3. the field is evaluated exactly only in a narrow band around its zero set (located from
   samples of the skin, hair and bun surfaces); the rest of the grid takes the sign of the
   band next to it; marching cubes extracts the surface at a voxel size set from the wanted
   face count; the neck is cut open by a plane and only the main component is kept;
4. a spherical uv atlas (seam at the back) and a texture baked from the region labels of the
   model (skin tone, brows, lips, eyes with iris and pupil, hair) transferred to each texel.

The result is returned in FLAME space; `write_scan` stores it in FaceVerse's convention.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import trimesh
from PIL import Image
from scipy import ndimage
from skimage.measure import marching_cubes

from lib.dataset.faceverse_io import flame_to_scan_space, save_flame_params
from lib.synthetic.hair import HAIR_STYLES, HairVolume, MeshDistance, mesh_components, scalp_weights
from lib.synthetic.texture import (
    HAIR_COLORS,
    IRIS_COLORS,
    SKIN_TONES,
    ValueNoise,
    bake_texture,
    paint_colors,
    spherical_uvs,
)
from lib.utils.atomic import atomic_write_bytes
from lib.utils.knn import NearestTree

__all__ = ["ScanMesh", "HeadContext", "make_style", "make_scan", "write_scan", "STYLE_ORDER"]

STYLE_ORDER = tuple(HAIR_STYLES)  # every hair style, in a fixed order
FACES_PER_AREA = 3.0  # marching-cubes faces per (area / voxel^2), measured


@dataclass
class ScanMesh:
    """A textured scan in FLAME space plus the parameters of the head model it was built on.

    vertices (N, 3) float64, faces (F, 3) int64, uvs (U, 2) in [0, 1] (v up), face_uvs (F, 3),
    texture (Ht, Wt, 3) uint8; shape (100,), expression (50,), pose (15,) float32.
    """

    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray
    face_uvs: np.ndarray
    texture: np.ndarray
    shape: np.ndarray
    expression: np.ndarray
    pose: np.ndarray


class HeadContext:
    """A FLAME-format head model with its region labels, ready to pose.

    flame: a lib.flame.FLAME; labels: dict name -> (V,) bool (the region names of
    lib/synthetic/head_model.region_labels).
    """

    def __init__(self, flame, labels: dict):
        self.flame = flame
        self.faces = flame.faces.cpu().numpy().astype(np.int64)
        V = flame.num_vertices
        missing = [k for k in ("scalp", "face", "brows", "lips", "eyes") if k not in labels]
        if missing:
            raise ValueError(f"HeadContext: region labels lack {missing}")
        self.labels = {k: np.asarray(v, dtype=np.float64).reshape(V) for k, v in labels.items()}
        self.components = mesh_components(V, self.faces)

    @classmethod
    def from_path(cls, model_path, flame=None) -> HeadContext:
        """Load FLAME (unless given) and the synthetic model's region labels from a
        generic_model.pkl."""
        from lib.flame import FLAME
        from lib.flame.loader import load_flame_model
        from lib.synthetic.head_model import region_labels

        flame = FLAME(str(model_path)) if flame is None else flame
        return cls(flame, region_labels(load_flame_model(str(model_path))))


def _as_context(head) -> HeadContext:
    if isinstance(head, HeadContext):
        return head
    if isinstance(head, (str, os.PathLike)):
        return HeadContext.from_path(head)
    if getattr(head, "model_path", None) is None:
        raise TypeError("make_scan: head must be a model path, a FLAME module or a HeadContext")
    return HeadContext.from_path(head.model_path, flame=head)


def make_style(index: int, rng: np.random.Generator) -> dict:
    """A look that cycles hair styles and colours with the index (for tests that want every
    style; the generator draws persons with `lib.synthetic.population`).

    Returns dict(hair str, skin (3,), hair_color (3,), iris (3,)).
    """
    jit = lambda c, s: np.clip(c * rng.uniform(1 - s, 1 + s, 3), 0.0, 1.0)  # noqa: E731
    return {
        "hair": STYLE_ORDER[index % len(STYLE_ORDER)],
        "skin": jit(SKIN_TONES[(3 * index) % len(SKIN_TONES)], 0.04),
        "hair_color": jit(HAIR_COLORS[(5 * index + 1) % len(HAIR_COLORS)], 0.08),
        "iris": jit(IRIS_COLORS[(2 * index) % len(IRIS_COLORS)], 0.1),
    }


def _lattice_samples(v: np.ndarray, faces: np.ndarray, spacing: float):
    """Points covering triangles at most `spacing` apart -> (face (N,), bary (N, 3))."""
    tri = v[faces]
    edge = np.linalg.norm(tri - np.roll(tri, 1, axis=1), axis=2).max(1)
    levels = np.maximum(1, np.ceil(edge / spacing)).astype(np.int64)
    fs, bs = [], []
    for L in np.unique(levels):
        i, j = np.meshgrid(np.arange(L + 1), np.arange(L + 1), indexing="ij")
        keep = (i + j) <= L
        b = np.stack([i[keep], j[keep], L - i[keep] - j[keep]], 1) / float(L)
        idx = np.nonzero(levels == L)[0]
        fs.append(np.repeat(idx, len(b)))
        bs.append(np.tile(b, (len(idx), 1)))
    return np.concatenate(fs), np.concatenate(bs)


def clip_below(v: np.ndarray, f: np.ndarray, y0: float):
    """Cut a mesh with the plane y = y0, keeping the part above (open, no cap).

    v: (N, 3), f: (F, 3) -> (v' (N', 3), f' (F', 3)); crossing triangles are split exactly,
    with shared cut points on shared edges, so the cut is a clean boundary loop.
    """
    s = v[:, 1] - y0
    s = np.where(np.abs(s) < 1e-12, 1e-12, s)
    up = s > 0
    n_up = up[f].sum(1)
    keep = f[n_up == 3]
    mixed = f[(n_up == 1) | (n_up == 2)]
    lone = up[mixed] if len(mixed) else np.zeros((0, 3), bool)
    lone = np.where((lone.sum(1) == 1)[:, None], lone, ~lone)  # the vertex alone on its side
    k = np.argmax(lone, axis=1)
    rolled = mixed[np.arange(len(mixed))[:, None], (k[:, None] + np.arange(3)) % 3]
    a, b, c = rolled.T
    V = len(v)
    edges = np.concatenate([np.sort(np.stack([a, b], 1), 1), np.sort(np.stack([a, c], 1), 1)])
    keys, inv = np.unique(edges[:, 0] * V + edges[:, 1], return_inverse=True)
    i, j = keys // V, keys % V
    t = s[i] / (s[i] - s[j])
    cut = v[i] + (v[j] - v[i]) * t[:, None]
    p_ab, p_ac = V + inv[:len(a)], V + inv[len(a):]
    one = up[a]  # a above: one triangle; a below: a quad of two triangles
    tris = [keep, np.stack([a, p_ab, p_ac], 1)[one],
            np.stack([p_ab, b, c], 1)[~one], np.stack([p_ab, c, p_ac], 1)[~one]]
    faces = np.concatenate(tris)
    verts = np.concatenate([v, cut])
    used, faces = np.unique(faces, return_inverse=True)
    return verts[used], faces.reshape(-1, 3)


def _interp(values: np.ndarray, faces: np.ndarray, face: np.ndarray, bary: np.ndarray):
    """Barycentric interpolation of per-vertex values (V,) or (V, Ch) at (face, bary)."""
    vals = values[faces[face]]
    return np.einsum("mk,mk->m", bary, vals) if vals.ndim == 2 else \
        np.einsum("mk,mkc->mc", bary, vals)


def _head_frame(v: np.ndarray, lab: dict, skin_v: np.ndarray) -> dict:
    """Landmarks of the posed model in its root frame. v: (V, 3); skin_v: skin vertex ids.

    Returns dict(y_cut neck cut height, centre (3,) cranium centre, radius R (median
    centre-scalp distance), anchor (3,) back-of-crown scalp point or None, brow_y).
    """
    face = lab["face"] > 0.5
    y_chin = float(v[face, 1].min()) if face.any() else float(v[skin_v, 1].mean())
    y_min = float(v[skin_v, 1].min())
    upper = skin_v[v[skin_v, 1] > y_chin]
    centre = 0.5 * (v[upper].min(0) + v[upper].max(0))
    scalp = np.nonzero(lab["scalp"] > 0.5)[0]
    if len(scalp):
        dirs = v[scalp] - centre
        dist = np.linalg.norm(dirs, axis=1)
        radius = float(np.median(dist))
        anchor = v[scalp[np.argmax(dirs @ np.array([0.0, 0.55, -0.84]) / dist)]]
    else:
        radius, anchor = 0.5 * float((v[upper].max(0) - v[upper].min(0)).max()), None
    brows = lab["brows"] > 0.5
    return {"y_cut": y_min + 0.25 * (y_chin - y_min), "centre": centre, "radius": radius,
            "anchor": anchor, "brow_y": float(v[brows, 1].mean()) if brows.any() else centre[1]}


def _extract(field_fn, samples: np.ndarray, lo: np.ndarray, hi: np.ndarray, h: float,
             reach: int):
    """Marching cubes of field_fn's zero set on a grid of spacing h over [lo, hi].

    field_fn: (N, 3) -> (N,) negative inside; samples: (M, 3) points near the zero set.
    The field is evaluated only within `reach` voxels (per axis) of a sample; every other
    grid region takes the majority sign of the band voxels next to it.
    Returns vertices (N, 3), faces (F, 3) oriented outward.
    """
    dims = np.ceil((hi - lo) / h).astype(np.int64) + 1
    ijk = np.floor((samples - lo) / h).astype(np.int64)
    ijk = ijk[np.all((ijk >= 0) & (ijk < dims), axis=1)]
    band = np.zeros(dims, dtype=bool)
    band[tuple(ijk.T)] = True
    band = ndimage.binary_dilation(band, structure=np.ones((3, 3, 3), bool), iterations=reach)
    idx = np.nonzero(band)
    x = lo + np.stack(idx, 1) * h
    grid = np.zeros(dims)
    grid[idx] = np.concatenate([field_fn(x[s:s + 200_000]) for s in range(0, len(x), 200_000)])
    comp, n_comp = ndimage.label(~band)
    votes = np.zeros(n_comp + 1)
    sgn = np.sign(grid) * band
    for ax in range(3):
        a, b = [slice(None)] * 3, [slice(None)] * 3
        a[ax], b[ax] = slice(1, None), slice(None, -1)
        for p, q in ((a, b), (b, a)):
            votes += np.bincount(comp[tuple(p)].ravel(), weights=sgn[tuple(q)].ravel(),
                                 minlength=n_comp + 1)
    fill = np.where(votes < 0, -1.0, 1.0) * (reach + 1) * h
    grid[~band] = fill[comp[~band]]
    mv, mf, _, _ = marching_cubes(grid, level=0.0, spacing=(h, h, h), allow_degenerate=False)
    mesh = trimesh.Trimesh(mv + lo, mf, process=True)
    top = int(np.argmax(mesh.vertices[:, 1]))
    if mesh.vertex_normals[top, 1] < 0:
        mesh.invert()
    return np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64)


def _main_component(v: np.ndarray, f: np.ndarray):
    """Keep the connected component with most faces. v: (N, 3), f: (F, 3) -> (v', f')."""
    parts = trimesh.Trimesh(v, f, process=False).split(only_watertight=False)
    mesh = max(parts, key=lambda m: len(m.faces))
    return np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64)


def make_scan(head, shape, exp, pose, style: dict, rng: np.random.Generator,
              target_faces: int = 60000, texture_size: int = 1024) -> ScanMesh:
    """Build one synthetic scan of the head model posed by (shape, exp, pose).

    head: model path, FLAME module (with `model_path`) or HeadContext; shape: (100,),
    exp: (50,), pose: (15,); style: dict (see `lib.synthetic.population.draw_person`): hair
    in HAIR_STYLES, skin, hair_color, iris colours; optional: brow_color (brows and beard,
    default hair_color), int seed for the person's hair/skin/texture noise (without it `rng`
    draws them), hair_scale (hair length factor, 1), wrinkles (forehead wrinkle depth
    factor, 1), beard (0 none .. 1 full, 0); rng: numpy Generator; target_faces: approximate
    face count; texture_size: texture edge in pixels. Returns a ScanMesh in FLAME space.
    """
    ctx = _as_context(head)
    if style.get("hair") not in HAIR_STYLES:
        raise ValueError(f"make_scan: unknown hair style {style.get('hair')!r}")
    shape = np.asarray(shape, dtype=np.float32).reshape(-1)
    exp = np.asarray(exp, dtype=np.float32).reshape(-1)
    pose = np.asarray(pose, dtype=np.float32).reshape(-1)
    with torch.no_grad():
        out = ctx.flame(torch.as_tensor(shape)[None], torch.as_tensor(exp)[None],
                        torch.as_tensor(pose)[None])
    T = out.T[0].double().numpy()
    R0, t0 = T[0, :3, :3], T[0, :3, 3]
    v = (out.vertices[0].double().numpy() - t0) @ R0  # posed model in the root frame
    lab, F_all = ctx.labels, ctx.faces
    skin_faces = F_all[ctx.components[0]]
    eye_faces = [F_all[c] for c in ctx.components[1:] if len(c) >= 4]
    fr = _head_frame(v, lab, np.unique(skin_faces))
    centre, radius = fr["centre"], fr["radius"]

    # per-person randomness (hair, skin detail, texture) comes from style["seed"] when given,
    # so one person's scans differ only by expression and pose
    prng = np.random.default_rng(style["seed"]) if "seed" in style else rng
    hair = HairVolume(style["hair"], centre, radius, prng, bun_anchor=fr["anchor"],
                      scale=float(style.get("hair_scale", 1.0)))
    # hair starts one model edge inside the scalp, so no hair lies over a non-scalp vertex
    # (except where a long style extends it over the ears and the neck)
    edges = v[skin_faces] - v[np.roll(skin_faces, 1, axis=1)]
    edge = float(np.median(np.linalg.norm(edges, axis=2)))
    wv = scalp_weights(v, lab["scalp"] > 0.5, HAIR_STYLES[style["hair"]]["ramp"] * radius,
                       margin=1.5 * edge) * hair.coverage(v)
    if hair.p["long"] > 0 and (lab["face"] > 0.5).any():
        face_dist, _ = NearestTree(v[lab["face"] > 0.5]).query(v)
        wv = np.maximum(wv, hair.extension(v, face_dist))
    noise = ValueNoise(prng)
    bump_amp = 0.006 * radius
    wrinkle_amp = 0.007 * radius * float(style.get("wrinkles", 1.0))
    skin = MeshDistance(v, skin_faces)
    eyes = [MeshDistance(v, f) for f in eye_faces]

    def field_fn(x):  # skin + hair + detail, union eyeballs: (N, 3) -> (N,)
        sd, fi, b, c = skin.query(x)
        w = _interp(wv, skin.f, fi, b)
        f = hair.field(x, sd, c, w)
        f -= bump_amp * noise(x / (0.09 * radius), 2) * (1.0 - w)
        rise = np.clip((c[:, 1] - fr["brow_y"]) / (0.45 * radius), 0.0, 1.0)
        forehead = np.sin(np.pi * rise) ** 2 * _interp(lab["face"], skin.f, fi, b)
        f -= wrinkle_amp * forehead * np.sin(2 * np.pi * (c[:, 1] - fr["brow_y"]) / (0.11 * radius)
                                             + 1.5 * noise(x / (0.4 * radius) + 5.0))
        for e in eyes:
            near = np.linalg.norm(x - e.centre, axis=1) < e.radius + 0.3 * radius
            if near.any():
                f[near] = np.minimum(f[near], e.query(x[near])[0])
        return f

    # voxel size from the wanted face count; samples of every surface locate the band
    tri = v[skin_faces]
    area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1) / 2
    area = float(area[tri.mean(1)[:, 1] > fr["y_cut"]].sum()) * (1.1 if hair.has_hair else 1.0)
    h = float(np.sqrt(FACES_PER_AREA * area / max(int(target_faces), 1000)))
    fs, bs = _lattice_samples(v, skin_faces, 0.6 * h)
    pts = [_interp(v, skin_faces, fs, bs)]
    for f in eye_faces:
        pts.append(_interp(v, f, *_lattice_samples(v, f, 0.6 * h)))
    if hair.has_hair:
        ns = _interp(skin.vn, skin_faces, fs, bs)
        ns /= np.linalg.norm(ns, axis=1, keepdims=True) + 1e-12
        pts.append(hair.surface_samples(pts[0], ns, _interp(wv, skin_faces, fs, bs), 0.6 * h))
    # a grid edge crossing the surface has both ends within 1.46 h + the largest displacement
    # from the sampled surfaces (per axis) of a sample: dilating that far makes the band exact
    shift = max(bump_amp + wrinkle_amp, hair.max_shift)
    reach = int(np.ceil(1.46 + shift / h))
    margin = hair.max_thickness + (reach + 2) * h
    lo, hi = v[np.unique(skin_faces)].min(0) - margin, v[np.unique(skin_faces)].max(0) + margin
    if hair.bounds() is not None:
        blo, bhi = hair.bounds()
        lo, hi = np.minimum(lo, blo - (reach + 2) * h), np.maximum(hi, bhi + (reach + 2) * h)
    lo[1] = fr["y_cut"] - 3 * h
    sv, sf = _extract(field_fn, np.concatenate(pts), lo, hi, h, reach)
    sv, sf = _main_component(*clip_below(sv, sf, fr["y_cut"]))

    # texture: labels of the closest model surface (skin or eyeball) at every scan vertex
    uvs, face_uvs = spherical_uvs(sv, sf, centre)
    d_skin, fi, b_skin, _ = skin.query(sv)
    gface, b, best = skin.f[fi], b_skin.copy(), np.abs(d_skin)
    for e in eyes:
        near = np.nonzero(np.linalg.norm(sv - e.centre, axis=1) < e.radius + 0.3 * radius)[0]
        if len(near):
            de, fe, be, _ = e.query(sv[near])
            better = np.abs(de) < best[near]
            sel = near[better]
            gface[sel], b[sel], best[sel] = e.f[fe[better]], be[better], np.abs(de[better])
    names = ["brows", "lips", "eyes", "nose", "face", "mouth", "hair", "cheek", "beard"]
    cols = [np.einsum("nk,nk->n", b, lab[k][gface]) if k in lab else np.zeros(len(sv))
            for k in names[:6]]
    # hair: the hair weight under the vertex, or the vertex stands well off the skin (a bun
    # or ponytail over skin without hair weight), unless an eyeball is the closer surface
    off_skin = np.clip((d_skin - 0.02 * radius) / (0.03 * radius), 0.0, 1.0)
    off_skin[best < np.abs(d_skin)] = 0.0
    cols.append(np.maximum(_interp(wv, skin.f, fi, b_skin), off_skin))
    eye_c = (out.joints[0, 3:5].double().numpy() - t0) @ R0  # joints 3, 4: left (+x), right
    if len(eyes) >= 2:  # eyeball centres, matched to the joints by side
        eye_c = np.array(sorted((e.centre for e in eyes[:2]), key=lambda c: -c[0]))
    gaze = np.einsum("ij,njk,k->ni", R0.T, T[3:5, :3, :3], np.array([0.0, 0.0, 1.0]))
    dc = np.linalg.norm(sv[:, None] - (eye_c + [0.0, -0.32 * radius, 0.0])[None], axis=2)
    cols.append(cols[4] * np.exp(-(dc.min(1) / (0.22 * radius)) ** 2))
    # beard: the face below the nose (0.45 R under the eyes), off the lips
    below = np.clip((eye_c[:, 1].mean() - 0.45 * radius - sv[:, 1]) / (0.15 * radius), 0, 1)
    cols.append(cols[4] * below * (1.0 - np.clip(cols[1] + cols[5], 0.0, 1.0)))
    table = np.concatenate([sv, np.stack(cols, 1)], 1)
    look = {"skin": style["skin"], "hair": style["hair_color"], "iris": style["iris"],
            "bald": style["hair"] == "bald", "beard": float(style.get("beard", 0.0)),
            "brow": style.get("brow_color", style["hair_color"])}
    eyes_info = {"centres": eye_c, "gaze": gaze}
    tex_noise = ValueNoise(prng)

    def color_fn(face, bary):  # texels -> colours
        vals = _interp(table, sf, face, bary)
        attrs = {k: vals[:, 3 + i] for i, k in enumerate(names)}
        return paint_colors(vals[:, :3], attrs, look, eyes_info, tex_noise, radius, centre)

    texture = bake_texture(int(texture_size), uvs, face_uvs, color_fn)
    return ScanMesh(vertices=sv @ R0.T + t0, faces=sf, uvs=uvs, face_uvs=face_uvs,
                    texture=texture, shape=shape, expression=exp, pose=pose)


def write_scan(out_dir, scan_id: str, scan: ScanMesh, scale: float, transl_xy, z_offset: float,
               z_shift: float) -> dict:
    """Write `scan` in FaceVerse's layout and convention.

    Files: <out>/faceverse_dataset/<id>/<id>.obj, .mtl, .jpg and <out>/flame_params/
    <id>_flame.pkl (written last: its presence marks a complete scan). scale: scalar;
    transl_xy: (2,); z_offset: arbitrary z placement; z_shift: the model's z shift.
    Returns dict of the written paths.
    """
    out_dir = Path(out_dir)
    v_scan, transl = flame_to_scan_space(scan.vertices, scale, transl_xy, z_shift, z_offset)
    sdir = out_dir / "faceverse_dataset" / scan_id
    paths = {"obj": sdir / f"{scan_id}.obj", "mtl": sdir / f"{scan_id}.mtl",
             "texture": sdir / f"{scan_id}.jpg",
             "params": out_dir / "flame_params" / f"{scan_id}_flame.pkl"}
    paths["params"].unlink(missing_ok=True)  # a rewrite is complete only when it is back
    buf = io.BytesIO()
    Image.fromarray(scan.texture).save(buf, format="JPEG", quality=92)
    atomic_write_bytes(paths["texture"], buf.getvalue())
    mtl = (f"newmtl material_0\nKa 1.0 1.0 1.0\nKd 1.0 1.0 1.0\nKs 0.0 0.0 0.0\n"
           f"d 1.0\nillum 1\nmap_Kd {scan_id}.jpg\n")
    atomic_write_bytes(paths["mtl"], mtl.encode())
    fv = np.stack([scan.faces, scan.face_uvs], 2).reshape(-1, 6) + 1  # v/vt per corner
    text = f"mtllib {scan_id}.mtl\nusemtl material_0\n"
    text += "".join("v {:.7f} {:.7f} {:.7f}\n".format(*r) for r in v_scan)
    text += "".join("vt {:.7f} {:.7f}\n".format(*r) for r in scan.uvs)
    text += "".join("f {}/{} {}/{} {}/{}\n".format(*r) for r in fv.tolist())
    atomic_write_bytes(paths["obj"], text.encode())
    betas = np.concatenate([np.asarray(scan.shape, np.float32).reshape(-1),
                            np.asarray(scan.expression, np.float32).reshape(-1)])
    save_flame_params(paths["params"], scan.pose, betas, scale, transl)
    return paths
