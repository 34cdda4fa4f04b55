"""Demo gallery: loss plots from Lightning CSV logs and a static HTML page of results.

No arrays or tensors cross this module's interface (shape-free); images/videos are files.

- `plot_losses(metrics_csv, out_png, title, keys=None)` reads one or several Lightning
  `CSVLogger` files (`epoch,step,train/loss,...,val/iou`; empty cells where a quantity was
  not logged at that step), concatenates them (e.g. version_0 and version_1 of a resumed
  run), sorts by step, and draws one small subplot per quantity: `train/*` (or the given
  keys) as lines, `val/*` as markers (on the matching `train/` panel when there is one).
- `write_gallery(out_html, title, intro, sections)` writes a self-contained page that opens
  from disk (file://, no server). Every referenced file must exist; links are relative to
  the page's folder so the folder can be moved. A small inline script checks after load that
  every image decoded and every video produced metadata, and writes the outcome as JSON into
  `<pre id="load-report">` and sets `document.body.dataset.loaded = "done"` (used by the
  headless-browser test).

Both files are written atomically (temporary name in the same folder, then os.replace).
"""
from __future__ import annotations

import csv
import html
import math
import os
import sys
import warnings
from pathlib import Path
from urllib.parse import quote

from lib.utils.atomic import atomic_path
from lib.utils.errors import ModuleErrors

__all__ = ["read_metrics", "plot_losses", "write_gallery", "IMAGE_SUFFIXES", "VIDEO_TYPES"]

_err = ModuleErrors(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")
VIDEO_TYPES = {".mp4": "video/mp4", ".webm": "video/webm"}
_INDEX_COLUMNS = ("epoch", "step")


# ----------------------------------------------------------------------------- loss plots
def _cell(text: str) -> float:
    """One CSV cell as a float; empty or non-numeric cells are NaN."""
    text = (text or "").strip()
    if not text:
        return math.nan
    try:
        return float(text)
    except ValueError:
        return math.nan


def read_metrics(metrics_csv) -> tuple[list[str], list[dict[str, float]]]:
    """Read one or several Lightning metrics.csv files.

    metrics_csv: a path or a list of paths. Returns (columns, rows): the union of column
    names in first-seen order, and one dict column -> float (NaN where empty) per logged row,
    all files concatenated and stably sorted by step.
    """
    paths = [metrics_csv] if isinstance(metrics_csv, (str, os.PathLike)) else list(metrics_csv)
    if not paths:
        raise _err("plot_losses got no metrics.csv file")
    columns: list[str] = []
    rows: list[dict[str, float]] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise _err(f"metrics file {p} does not exist")
        with open(p, newline="") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            if "step" not in header:
                raise _err(f"metrics file {p} has no 'step' column "
                           f"(header: {header})")
            file_rows = []
            for raw in reader:
                row = {k.strip(): _cell(v) for k, v in raw.items()
                       if k is not None and not isinstance(v, list)}
                if not math.isnan(row.get("step", math.nan)):
                    file_rows.append(row)
        values = [v for r in file_rows for k, v in r.items()
                  if k not in _INDEX_COLUMNS and not math.isnan(v)]
        if not values:
            raise _err(f"metrics file {p} has no numeric data "
                       f"(no row with a step and a logged value)")
        columns += [h for h in header if h not in columns]
        rows += file_rows
    rows.sort(key=lambda r: r["step"])                           # stable: files keep order
    return columns, rows


def _series(rows, key) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows where `key` was logged."""
    pts = [(r["step"], r.get(key, math.nan)) for r in rows]
    pts = [(s, v) for s, v in pts if math.isfinite(v)]
    return [s for s, _ in pts], [v for _, v in pts]


def plot_losses(metrics_csv, out_png, title: str, keys: list[str] | None = None) -> Path:
    """Plot logged quantities against the training step and save a PNG atomically.

    metrics_csv: Path or list of Paths to Lightning CSVLogger files (concatenated, sorted by
    step). keys: quantities to draw (default: every `train/*` column with data; if there is
    none, every other numeric column). `val/*` columns are drawn as markers, on the panel of
    `train/<same name>` when that is drawn, else on a panel of their own. A panel uses a log
    y axis when all its values are positive and span more than a factor 3 (a flat curve
    reads better on a linear axis). Returns out_png.
    """
    columns, rows = read_metrics(metrics_csv)
    has_data = {c: bool(_series(rows, c)[0]) for c in columns}
    if keys is None:
        line_keys = [c for c in columns if c.startswith("train/") and has_data[c]]
        if not line_keys:
            line_keys = [c for c in columns if c not in _INDEX_COLUMNS
                         and not c.startswith("val/") and has_data[c]]
        val_keys = [c for c in columns if c.startswith("val/") and has_data[c]]
    else:
        missing = [k for k in keys if k not in columns]
        if missing:
            raise _err(f"keys {missing} are not columns of {metrics_csv} "
                       f"(columns: {columns})")
        line_keys = [k for k in keys if not k.startswith("val/")]
        val_keys = [k for k in keys if k.startswith("val/")]
    # panels: name -> (line key or None, marker key or None)
    panels: dict[str, list] = {k: [k, None] for k in line_keys}
    for v in val_keys:
        twin = "train/" + v[len("val/"):]
        if twin in panels:
            panels[twin][1] = v
        else:
            panels[v] = [None, v]
    if not panels:
        raise _err(f"nothing to plot in {metrics_csv} (columns: {columns})")

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:                   # never switch a live pyplot
        matplotlib.use("Agg")
    from matplotlib.figure import Figure

    n = len(panels)
    ncols = min(3, n)
    nrows = (n + ncols - 1) // ncols
    fig = Figure(figsize=(4.0 * ncols, 2.7 * nrows + 0.5), dpi=100)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, (name, (line_key, val_key)) in zip(axes.ravel(), panels.items()):
        all_vals: list[float] = []
        if line_key is not None:
            s, v = _series(rows, line_key)
            # a quantity logged only a few times (e.g. the first epoch's bootstrapping) gets
            # markers too, or a single point would be invisible
            ax.plot(s, v, lw=1.0, color="tab:blue", label=line_key,
                    marker="o" if len(v) < 5 else None, ms=3)
            all_vals += v
        if val_key is not None:
            s, v = _series(rows, val_key)
            ax.plot(s, v, ls="none", marker="o", ms=4, color="tab:orange", label=val_key)
            all_vals += v
        if all_vals and min(all_vals) > 0 and max(all_vals) > 3.0 * min(all_vals):
            ax.set_yscale("log")                 # positive and spanning > 3x: log axis
        ax.set_title(name, fontsize=9)
        ax.tick_params(which="both", labelsize=7)
        ax.set_xlabel("step", fontsize=7)
        ax.grid(alpha=0.3)
        if line_key is not None and val_key is not None:
            ax.legend(fontsize=7)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return out_png


# ----------------------------------------------------------------------------- gallery
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1400px; padding: 1em 1.5em; color: #222; background: #fafafa; }
h1 { margin-bottom: .2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em;
       margin-top: 1.6em; }
.intro, .text { white-space: pre-wrap; line-height: 1.4; max-width: 60em; }
nav a { margin-right: 1em; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr));
        gap: 1em; align-items: start; }
figure.wide { grid-column: 1 / -1; }
figure.wide img { width: auto; max-width: 100%; }
figure { margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px;
         padding: .5em; }
figure img, figure video { width: 100%; height: auto; display: block; background: #fff; }
figcaption { font-size: .9em; color: #444; margin-top: .4em; white-space: pre-wrap; }
table { border-collapse: collapse; font-size: .9em; width: 100%; }
td { border-top: 1px solid #eee; padding: .15em .4em; vertical-align: top; }
td.key { color: #555; } td.val { font-family: ui-monospace, monospace; text-align: right; }
pre.textitem { white-space: pre-wrap; font-size: .85em; margin: 0; }
#load-report { font-size: .8em; color: #888; }
"""

# Runs after window load: every <img> must have decoded, every <video> must reach
# readyState >= 1 (metadata) -- an error on the video or on its last <source>, or 10 s
# without metadata, counts as a failure. The outcome goes into #load-report as JSON.
_SCRIPT = """
window.addEventListener("load", function () {
  var failed = [];
  var imgs = Array.prototype.slice.call(document.querySelectorAll("img"));
  imgs.forEach(function (im) {
    if (!(im.complete && im.naturalWidth > 0)) { failed.push(im.getAttribute("src")); }
  });
  var vids = Array.prototype.slice.call(document.querySelectorAll("video"));
  function videoSrc(v) {
    var s = v.querySelector("source");
    return s ? s.getAttribute("src") : v.getAttribute("src");
  }
  function check(v) {
    return new Promise(function (resolve) {
      var done = false;
      function finish(ok) {
        if (done) { return; }
        done = true;
        if (!ok) { failed.push(videoSrc(v)); }
        resolve();
      }
      if (v.readyState >= 1) { finish(true); return; }
      if (v.error || v.networkState === 3) { finish(false); return; }
      v.addEventListener("loadedmetadata", function () { finish(true); });
      v.addEventListener("error", function () { finish(false); });
      var sources = v.querySelectorAll("source");
      if (sources.length) {
        sources[sources.length - 1].addEventListener("error", function () { finish(false); });
      }
      setTimeout(function () { finish(v.readyState >= 1); }, 10000);
    });
  }
  Promise.all(vids.map(check)).then(function () {
    var report = {ok: failed.length === 0, images: imgs.length, videos: vids.length,
                  failed: failed};
    document.getElementById("load-report").textContent = JSON.stringify(report);
    document.body.dataset.loaded = "done";
  });
});
"""


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:   # numpy/torch scalars
        return _fmt(value.item())
    return str(value)


def _href(path: Path, folder: Path) -> str:
    """Link to `path` relative to `folder`, forward slashes, URL-quoted."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(folder))
    return quote(rel.replace(os.sep, "/"), safe="/")


def _item_kind(item: dict, where: str) -> str:
    kind = item.get("kind")
    if kind is None and "path" in item:                          # infer from the suffix
        suffix = Path(item["path"]).suffix.lower()
        kind = "image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_TYPES \
            else None
    if kind not in ("image", "video", "table", "text"):
        raise _err(f"{where}: kind must be image/video/table/text, got "
                   f"{kind!r}")
    return kind


def _render_item(item: dict, folder: Path, where: str) -> str:
    if not isinstance(item, dict):
        raise _err(f"{where} must be a dict, got {type(item).__name__}")
    kind = _item_kind(item, where)
    caption = item.get("caption", "")
    body: str
    if kind in ("image", "video"):
        if "path" not in item:
            raise _err(f"{where}: a {kind} item needs a 'path'")
        path = Path(item["path"])
        if not path.is_file():
            raise _err(f"{where}: file {path} does not exist", FileNotFoundError)
        suffix = path.suffix.lower()
        href = _href(path, folder)
        if not os.path.abspath(path).startswith(os.path.abspath(folder) + os.sep):
            warnings.warn(f"{_err.where}: {where}: {path} lies outside the gallery folder "
                          f"{folder}; the page breaks if the folder is moved alone")
        if kind == "image":
            if suffix not in IMAGE_SUFFIXES:
                raise _err(f"{where}: {path} is not an image "
                           f"({', '.join(IMAGE_SUFFIXES)})")
            body = f'<img src="{href}" alt="{_esc(caption)}" loading="eager">'
        else:
            if suffix not in VIDEO_TYPES:
                raise _err(f"{where}: {path} is not a video "
                           f"({', '.join(VIDEO_TYPES)})")
            body = (f'<video controls loop muted autoplay playsinline preload="auto">'
                    f'<source src="{href}" type="{VIDEO_TYPES[suffix]}">'
                    f'video {_esc(path.name)} cannot be played here</video>')
    elif kind == "table":
        data = item.get("data")
        if not isinstance(data, dict):
            raise _err(f"{where}: a table item needs 'data' as a dict")
        cells = "".join(f'<tr><td class="key">{_esc(k)}</td>'
                        f'<td class="val">{_esc(_fmt(v))}</td></tr>' for k, v in data.items())
        body = f"<table>{cells}</table>"
    else:                                                        # text
        if "text" in item:
            text = str(item["text"])
        elif "path" in item:
            path = Path(item["path"])
            if not path.is_file():
                raise _err(f"{where}: file {path} does not exist", FileNotFoundError)
            text = path.read_text(errors="replace")
        else:
            raise _err(f"{where}: a text item needs 'text'")
        body = f'<pre class="textitem">{_esc(text)}</pre>'
    cap = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
    cls = f"{kind} wide" if item.get("wide") else kind
    return f'<figure class="{cls}">{body}{cap}</figure>'


def write_gallery(out_html, title: str, intro: str, sections: list[dict]) -> Path:
    """Write a static HTML gallery (opens from file://) atomically. Returns out_html.

    sections: [{"title": str, "text": str (optional plain text),
                "items": [{"path": Path, "caption": str,
                           "kind": "image"|"video"|"table"|"text",
                           "data": dict (table), "text": str (text),
                           "wide": bool (optional: span the whole row, e.g. loss plots)},
                          ...]}, ...]
    `kind` may be left out for a path with an image/video suffix.
    Images: .png/.jpg/.jpeg/.gif/.webp; videos: .mp4/.webm. All text is HTML-escaped.
    Raises FileNotFoundError (naming the file and the section) for a missing image/video,
    ValueError for a malformed section or item.
    """
    out_html = Path(out_html)
    folder = out_html.parent
    parts, nav = [], []
    for si, sec in enumerate(sections):
        if not isinstance(sec, dict) or "title" not in sec:
            raise _err(f"section {si} must be a dict with a 'title'")
        sec_title = str(sec["title"])
        items = sec.get("items", [])
        figs = [_render_item(it, folder, f"section {sec_title!r} item {k}")
                for k, it in enumerate(items)]
        anchor = f"sec{si}"
        nav.append(f'<a href="#{anchor}">{_esc(sec_title)}</a>')
        text = f'<div class="text">{_esc(sec["text"])}</div>' if sec.get("text") else ""
        parts.append(f'<section id="{anchor}"><h2>{_esc(sec_title)}</h2>{text}'
                     f'<div class="grid">{"".join(figs)}</div></section>')
    page = "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body>",
        f"<h1>{_esc(title)}</h1>",
        f'<div class="intro">{_esc(intro)}</div>' if intro else "",
        f"<nav>{''.join(nav)}</nav>" if nav else "",
        *parts,
        '<h2>Page check</h2><pre id="load-report">pending</pre>',
        f"<script>{_SCRIPT}</script>",
        "</body></html>",
        "",
    ])
    with atomic_path(out_html) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out_html
