"""Textured OBJ loading and atomic mesh/array writing.

Shape legend: V vertices, F faces (triangles), U texture coordinates, Ht/Wt texture image
rows/columns.

`load_obj` is a numpy OBJ parser (no vertex merging or splitting, unlike trimesh, so vertex
order and count are exactly the file's):
- `v x y z [r g b]` (colours ignored), `vt u v [w]`, `f` with `v`, `v/vt`, `v//vn`, `v/vt/vn`
  corners; polygons are fan-triangulated; negative (relative) indices are resolved against
  the counts at that line, as the OBJ format defines;
- the texture image is the `map_Kd` of the first material (of the `.mtl` files named by
  `mtllib`) that has one; if there is no usable `.mtl`, an image next to the OBJ with the
  same stem (`.png`, `.jpg`, `.jpeg`) is used (`obj_source_files` lists the files a load
  reads, for provenance records).
Every failure raises `MeshLoadError` naming the file and the problem.

Damaged files are refused, not half-loaded (a copy or download cut short is the usual cause):
- a non-empty file that does not end with a newline ends mid-line: a cut at a random byte;
- counts stated in comments, when present (MeshLab's `# Vertices: <n>` / `# Faces: <n>`, and
  `# <n> vertices` / `# <n> faces` forms such as MeshLab's trailer
  `# <n> faces, <n> coords texture`),
  must match the `v` / `f` lines (the total or the per-object sum of the statements);
- a complete scan uses (nearly) all its vertices and texture coordinates: when more than
  `STRAY_FRACTION` (1%) of them and more than `STRAY_MIN` (16) are used by no face, the face
  list was cut short (a cut exactly at a line end) and the file is refused. A few stray
  vertices (scanner debris, a lone point) still load.

Writers (`save_ply`, `save_obj`, `save_npz`) write through `lib.utils.atomic.atomic_path`
(re-exported here with `TMP_MARK` for older callers): a temporary name
`.<stem>.tmp-<random><suffix>` in the target folder, then `os.replace`, so an interrupted
run never leaves a half-written file under the final name.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lib.utils.atomic import TMP_MARK, atomic_path  # noqa: F401  (re-exported)

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")

# Unreferenced vertices / texture coordinates tolerated before a file counts as truncated:
# more than STRAY_FRACTION of them AND more than STRAY_MIN is refused.
STRAY_FRACTION = 0.01
STRAY_MIN = 16

# Element counts some exporters state in comments: (element, pattern) pairs.
_COUNT_PATTERNS = (
    ("vertices", re.compile(r"\bvertices\s*:\s*(\d+)", re.I)),        # MeshLab: '# Vertices: <n>'
    ("faces", re.compile(r"\bfaces\s*:\s*(\d+)", re.I)),              # MeshLab: '# Faces: <n>'
    ("vertices", re.compile(r"\b(\d+)\s+vertices\b(?!\s+normals)", re.I)),  # '# <n> vertices, ...'
    ("faces", re.compile(r"\b(\d+)\s+faces\b", re.I)),                # '# <n> faces, <n> coords'
)
_MTLLIB_RE = re.compile(rb"^[ \t]*mtllib[ \t]([^\r\n]*)", re.M)


class MeshLoadError(Exception):
    """A mesh (or its material/texture) could not be loaded; the message names the file."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@dataclass
class TexturedMesh:
    """verts: [V, 3] float64; faces: [F, 3] int64; uvs: [U, 2] float64 or None (OBJ
    convention: v = 0 at the image bottom); face_uvs: [F, 3] int64 into uvs or None;
    texture: [Ht, Wt, 3] uint8 or None; texture_path: where the texture came from."""

    verts: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray | None = None
    face_uvs: np.ndarray | None = None
    texture: np.ndarray | None = None
    texture_path: str | None = None


def _fromstring(text: str, dtype) -> np.ndarray:
    """Whitespace-separated numbers -> 1-D array (stops at the first unparsable token)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # older numpy warns when it stops early
        try:
            return np.fromstring(text, sep=" ", dtype=dtype)
        except ValueError:  # newer numpy raises instead; callers check sizes and fall back
            return np.zeros(0, dtype=dtype)


def _floats(path, lines: list[str], ncols: int, what: str) -> np.ndarray:
    """lines: 'x y z ...' strings (prefix removed) -> [len(lines), ncols] float64."""
    arr = _fromstring(" ".join(lines), np.float64)
    k = len(lines[0].split())
    if arr.size == len(lines) * ncols:
        arr = arr.reshape(len(lines), ncols)
    elif (k > ncols and arr.size == len(lines) * k
          and all(len(ln.split()) == k for ln in lines)):  # extra columns: vertex colours, vt w
        arr = arr.reshape(len(lines), k)[:, :ncols]
    else:  # lines of different lengths or a malformed line: one line at a time
        try:
            arr = np.array([ln.split()[:ncols] for ln in lines], dtype=np.float64)
        except ValueError:
            arr = None
        if arr is None or arr.ndim != 2 or arr.shape[1] != ncols:
            bad = next((ln for ln in lines if len(ln.split()) < ncols), "")
            raise MeshLoadError(path, f"malformed {what} line {bad.strip()[:60]!r}")
    if not np.isfinite(arr).all():
        raise MeshLoadError(path, f"non-finite {what} values")
    return arr


def _resolve(path, idx: np.ndarray, count_before, total: int, what: str):
    """idx: [n] raw OBJ indices (1-based, or negative = relative to the elements defined
    before the line); count_before: callable -> [n] those counts (only called when a
    negative index occurs) -> [n] 0-based int64."""
    if (idx == 0).any():
        raise MeshLoadError(path, f"face refers to {what} index 0 (OBJ indices start at 1)")
    out = idx - 1
    neg = idx < 0
    if neg.any():
        out = np.where(neg, count_before() + idx, out)
    bad = (out < 0) | (out >= total)
    if bad.any():
        raise MeshLoadError(path, f"face refers to {what} {int(idx[bad][0])}, "
                            f"but the file has {total}")
    return out


def _parse_faces(path, f_l, line_pos, n_v, n_vt):
    """f_l: face lines (prefix removed); line_pos(tag) -> line numbers of the 'v'/'vt'/'f'
    lines (only needed for negative indices) -> (faces [F,3], face_uvs [F,3] or None)."""
    counts = np.fromiter((len(ln.split()) for ln in f_l), np.int64, len(f_l))
    if (counts < 3).any():
        raise MeshLoadError(path, "face with fewer than 3 corners")
    corners = " ".join(f_l).split()
    k = corners[0].count("/")
    nums = None
    if k <= 2 and all(c.count("/") == k for c in corners):  # fast path: one corner format
        flat = _fromstring(" ".join(corners).replace("//", "/0/").replace("/", " "), np.int64)
        if flat.size == len(corners) * (k + 1):
            nums = flat.reshape(len(corners), k + 1)
            vi, ti = nums[:, 0], (nums[:, 1] if k >= 1 else np.zeros(len(corners), np.int64))
    if nums is None:  # mixed corner formats (or a malformed index): one corner at a time
        try:
            parts = [c.split("/") for c in corners]
            vi = np.array([int(p[0]) for p in parts], dtype=np.int64)
            ti = np.array([int(p[1]) if len(p) > 1 and p[1] else 0 for p in parts], np.int64)
        except (ValueError, OverflowError):
            raise MeshLoadError(path, "malformed face line (non-integer index)") from None
    missing = ti == 0  # no texture coordinate at this corner
    if missing.all():
        ti = None
    elif missing.any():
        raise MeshLoadError(path, f"{int(missing.sum())} of {len(ti)} face corners lack "
                            "texture coordinates while others have them")

    def before(tag):  # per corner: number of `tag` lines above its face line
        return lambda: np.searchsorted(line_pos(tag), np.repeat(line_pos("f"), counts))

    vi = _resolve(path, vi, before("v"), n_v, "vertex")
    if ti is not None:
        ti = _resolve(path, ti, before("vt"), n_vt, "texture coordinate")
    # fan triangulation: corner offsets of each polygon, triangles (0, j, j+1)
    if (counts == 3).all():
        tri = np.arange(len(corners)).reshape(-1, 3)
    else:
        start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        n_tri = counts - 2
        poly = np.repeat(np.arange(len(counts)), n_tri)
        j = np.arange(n_tri.sum()) - np.repeat(np.cumsum(n_tri) - n_tri, n_tri) + 1
        c0 = start[poly]
        tri = np.stack([c0, c0 + j, c0 + j + 1], axis=1)
    return vi[tri], (ti[tri] if ti is not None else None)


def _check_stated_counts(path, comments: list[str], n_v: int, n_f: int) -> None:
    """comments: the file's '#' lines. Counts they state must match the v / f lines: the
    stated total (or, for per-object statements, their sum). Raises MeshLoadError."""
    stated = {"vertices": [], "faces": []}  # kind -> [(count, comment line)]
    for ln in comments:
        for kind, pat in _COUNT_PATTERNS:
            stated[kind] += [(int(m.group(1)), ln.strip()[:60]) for m in pat.finditer(ln)]
    for kind, have in (("vertices", n_v), ("faces", n_f)):
        if not stated[kind]:
            continue
        most, line = max(stated[kind])
        if have not in (most, sum(c for c, _ in stated[kind])):
            raise MeshLoadError(path, f"has {have} {kind} but its comment {line!r} states "
                                f"{most}: the file looks truncated; re-copy or re-export it")


def _check_unreferenced(path, idx: np.ndarray, total: int, what: str) -> None:
    """idx: [F, 3] 0-based indices into `total` elements. More than STRAY_FRACTION of them
    and more than STRAY_MIN used by no face means the face list was cut short."""
    unused = total - int(np.count_nonzero(np.bincount(idx.ravel(), minlength=total)))
    if unused > STRAY_MIN and unused > STRAY_FRACTION * total:
        raise MeshLoadError(path, f"{unused} of {total} {what} are used by no face (more than "
                            f"{STRAY_FRACTION:.0%}): the face list looks cut short (truncated "
                            "file?); re-copy or re-export the scan, or remove the unreferenced "
                            f"{what} if it is complete")


def _mtllib_name(rest: str) -> str:
    """The text after 'mtllib ' -> the .mtl file name as load_obj reads it."""
    return rest.replace("\t", " ").strip()


def mtllib_names(path) -> list[str]:
    """The `mtllib` names of an OBJ, read in 1 MiB chunks (no parse of the geometry); the
    same names load_obj uses."""
    names, carry = [], b""
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(1 << 20)
            buf = carry + chunk
            cut = len(buf) if not chunk else buf.rfind(b"\n") + 1
            whole, carry = buf[:cut], buf[cut:]
            if b"mtllib" in whole:
                names += [_mtllib_name(m.decode("utf-8", errors="replace"))
                          for m in _MTLLIB_RE.findall(whole)]
            if not chunk:
                return names


def obj_source_files(path) -> list[tuple[str, Path]]:
    """The files `load_obj(path)` reads: [("scan mesh", the OBJ), ("material", each existing
    .mtl it names), ("texture", the image _find_texture picks, when there is one)]."""
    path = Path(path)
    libs = mtllib_names(path)
    out = [("scan mesh", path)]
    out += [("material", path.parent / n) for n in libs if (path.parent / n).is_file()]
    tex = _find_texture(path, libs)
    if tex is not None:
        out.append(("texture", tex))
    return out


def _find_texture(obj_path: Path, mtllibs: list[str]) -> Path | None:
    """First existing map_Kd image of the .mtl files, else an image with the OBJ's stem."""
    for lib_name in mtllibs:
        mtl = obj_path.parent / lib_name
        if not mtl.is_file():
            continue
        for ln in mtl.read_text(errors="replace").splitlines():
            ln = ln.strip()
            if not ln.lower().startswith("map_kd"):
                continue
            rest = ln[6:].strip()
            for cand in (rest, rest.split()[-1] if rest else ""):
                if cand and (mtl.parent / cand).is_file():
                    return mtl.parent / cand
    for suf in _IMAGE_SUFFIXES:
        cand = obj_path.with_suffix(suf)
        if cand.is_file():
            return cand
    return None


def load_texture_image(path) -> np.ndarray:
    """path: an image file -> [Ht, Wt, 3] uint8 RGB. Raises MeshLoadError."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            img = np.array(im.convert("RGB"))
    except Exception as e:  # PIL raises many types for broken files
        raise MeshLoadError(path, f"cannot read texture image ({type(e).__name__}: {e})") from None
    if img.ndim != 3 or img.shape[0] < 1 or img.shape[1] < 1:
        raise MeshLoadError(path, "empty texture image")
    return img


def load_obj(path, load_texture: bool = True, require_texture: bool = False) -> TexturedMesh:
    """Load a (textured) OBJ. path: the .obj file. require_texture: raise unless the mesh has
    texture coordinates on every face and a readable texture image. Returns TexturedMesh."""
    path = Path(path)
    if not path.is_file():
        raise MeshLoadError(path, "file not found")
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise MeshLoadError(path, f"cannot read ({e})") from None
    if "\x00" in text:
        raise MeshLoadError(path, "not a text OBJ file (contains NUL bytes)")
    if "\t" in text:
        text = text.replace("\t", " ")
    lines = text.splitlines()
    if text[:1] == " " or "\n " in text:
        lines = [ln.lstrip() for ln in lines]
    v_l = [ln[2:] for ln in lines if ln[:2] == "v "]
    vt_l = [ln[3:] for ln in lines if ln[:3] == "vt "]
    f_l = [ln[2:] for ln in lines if ln[:2] == "f "]
    mtllibs = [_mtllib_name(ln[6:]) for ln in lines if ln[:7] == "mtllib "]
    if not v_l:
        raise MeshLoadError(path, "no vertices (not an OBJ file?)")
    if text[-1] not in "\n\r":  # a cut at a random byte (module docstring)
        raise MeshLoadError(path, "ends mid-line: the file looks truncated (a complete OBJ "
                            "ends with a newline); re-copy or re-export it")
    if not f_l:
        raise MeshLoadError(path, "no faces")
    _check_stated_counts(path, [ln for ln in lines if ln[:1] == "#"], len(v_l), len(f_l))
    verts = _floats(path, v_l, 3, "vertex")
    uvs = _floats(path, vt_l, 2, "texture coordinate") if vt_l else None
    prefix = {"v": "v ", "vt": "vt ", "f": "f "}

    def line_pos(tag):
        p = prefix[tag]
        return np.array([i for i, ln in enumerate(lines) if ln[:len(p)] == p], dtype=np.int64)

    faces, face_uvs = _parse_faces(path, f_l, line_pos, len(v_l), len(vt_l))
    # a cut exactly at a line end in the face section leaves vertices no face uses
    _check_unreferenced(path, faces, len(verts), "vertices")
    if face_uvs is not None:
        _check_unreferenced(path, face_uvs, len(vt_l), "texture coordinates")
    mesh = TexturedMesh(verts=verts, faces=faces, uvs=uvs if face_uvs is not None else None,
                        face_uvs=face_uvs)
    if require_texture and face_uvs is None:
        raise MeshLoadError(path, "no texture coordinates (vt)")
    if load_texture or require_texture:
        tex = _find_texture(path, mtllibs)
        if tex is None and require_texture:
            where = f"map_Kd in {', '.join(mtllibs)}" if mtllibs else "no mtllib"
            raise MeshLoadError(path, f"texture image not found ({where}, no {path.stem}.png/.jpg)")
        if tex is not None:
            mesh.texture = load_texture_image(tex)
            mesh.texture_path = str(tex)
    return mesh


def save_npz(path, **arrays) -> None:
    """Write an uncompressed .npz (readable by np.load) atomically and reproducibly: the zip
    entries carry a fixed timestamp, so equal arrays give byte-identical files."""
    import zipfile

    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, val in arrays.items():
                info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.asanyarray(val), allow_pickle=False)


def _colors_u8(colors, n) -> np.ndarray:
    c = np.asarray(colors)
    if c.shape != (n, 3) and c.shape != (n, 4):
        raise ValueError(f"colors must be [{n}, 3|4], got {c.shape}")
    if c.dtype != np.uint8:
        c = np.clip(np.round(c.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return c[:, :3]


def save_ply(path, verts, faces=None, colors=None, normals=None) -> None:
    """Binary little-endian PLY, written atomically. verts: [V, 3]; faces: [F, 3] or None;
    colors: [V, 3] uint8 or float in [0, 1]; normals: [V, 3]."""
    v = np.asarray(verts, dtype=np.float32)
    n = len(v)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if normals is not None:
        fields += [("nx", "<f4"), ("ny", "<f4"), ("nz", "<f4")]
    if colors is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    rec = np.empty(n, dtype=fields)
    rec["x"], rec["y"], rec["z"] = v[:, 0], v[:, 1], v[:, 2]
    if normals is not None:
        nn = np.asarray(normals, dtype=np.float32)
        rec["nx"], rec["ny"], rec["nz"] = nn[:, 0], nn[:, 1], nn[:, 2]
    if colors is not None:
        c = _colors_u8(colors, n)
        rec["red"], rec["green"], rec["blue"] = c[:, 0], c[:, 1], c[:, 2]
    names = {"<f4": "float", "u1": "uchar"}
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    header += [f"property {names[t]} {k}" for k, t in fields]
    f_arr = None
    if faces is not None:
        f_arr = np.asarray(faces, dtype=np.int64)
        header += [f"element face {len(f_arr)}", "property list uchar int vertex_indices"]
        frec = np.empty(len(f_arr), dtype=[("n", "u1"), ("i", "<i4", (3,))])
        frec["n"] = 3
        frec["i"] = f_arr
    header.append("end_header")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(("\n".join(header) + "\n").encode("ascii"))
            fh.write(rec.tobytes())
            if f_arr is not None:
                fh.write(frec.tobytes())


def save_obj(path, verts, faces, uvs=None, face_uvs=None, texture_name=None) -> None:
    """Text OBJ written atomically. verts: [V, 3]; faces: [F, 3] (0-based); uvs: [U, 2];
    face_uvs: [F, 3] (0-based; defaults to faces when uvs has one row per vertex);
    texture_name: an image file name; if given, a .mtl next to the OBJ refers to it."""
    path = Path(path)
    v = np.asarray(verts, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64) + 1
    out = []
    if texture_name is not None:
        mtl = path.with_suffix(".mtl")
        with atomic_path(mtl) as tmp:
            tmp.write_text(f"newmtl material0\nKd 1 1 1\nmap_Kd {texture_name}\n")
        out += [f"mtllib {mtl.name}", "usemtl material0"]
    body = ["\n".join(out)] if out else []
    body.append("\n".join("v {:.7g} {:.7g} {:.7g}".format(*r) for r in v))
    if uvs is not None:
        fu = (np.asarray(face_uvs, dtype=np.int64) if face_uvs is not None else f - 1) + 1
        body.append("\n".join("vt {:.7g} {:.7g}".format(*r) for r in np.asarray(uvs)))
        body.append("\n".join(f"f {a}/{ta} {b}/{tb} {c}/{tc}"
                              for (a, b, c), (ta, tb, tc) in zip(f.tolist(), fu.tolist())))
    else:
        body.append("\n".join("f {} {} {}".format(*r) for r in f.tolist()))
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(body) + "\n")
