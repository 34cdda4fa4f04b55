"""Tests of lib/utils/gallery.py: loss plots, the static HTML gallery, and (slow) the page
loading in headless Chromium, which is installed with apt-get when missing (Debian, root).

All inputs (PNGs, an MP4 from save_video, a VP9 WebM, metrics.csv files) are made here.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

from lib.render.images import save_png, save_video
from lib.utils.gallery import plot_losses, read_metrics, write_gallery


# ----------------------------------------------------------------------------- helpers
class _PageParser(HTMLParser):
    """Collects media sources, figcaption texts, table cells, script tags, load report."""

    def __init__(self):
        super().__init__()
        self.srcs, self.captions, self.cells, self.scripts = [], [], [], 0
        self.report, self.body_attrs = None, {}
        self._in = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("img", "source") and "src" in a:
            self.srcs.append(a["src"])
        if tag == "script":
            self.scripts += 1
        if tag == "body":
            self.body_attrs = a
        if tag == "figcaption" or tag == "td" or (tag == "pre" and a.get("id") == "load-report"):
            self._in, self._buf = tag, []

    def handle_data(self, data):
        if self._in:
            self._buf.append(data)

    def handle_endtag(self, tag):
        if tag == self._in:
            text = "".join(self._buf)
            {"figcaption": self.captions, "td": self.cells}.get(tag, []).append(text)
            if tag == "pre":
                self.report = text
            self._in = None


def _parse(text: str) -> _PageParser:
    p = _PageParser()
    p.feed(text)
    return p


def _gradient(h=48, w=64, shift=0.0) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(xx / w + shift) % 1.0, yy / h, np.full((h, w), 0.4)], -1)


def _write_webm(path: Path, frames, fps=10) -> Path:
    """VP9 WebM through imageio-ffmpeg (the call reported for the demo)."""
    import imageio.v2 as imageio

    with imageio.get_writer(str(path), format="FFMPEG", mode="I", fps=fps,
                            codec="libvpx-vp9", pixelformat="yuv420p", macro_block_size=1,
                            output_params=["-b:v", "0", "-crf", "32"]) as w:
        for f in frames:
            w.append_data((np.clip(f, 0, 1) * 255 + 0.5).astype(np.uint8))
    return path


def _make_site(root: Path, with_webm: bool = True) -> tuple[Path, list[dict]]:
    """Media in sub-folders of root (one name with a space and '#'); returns (root, sections)."""
    (root / "img").mkdir(parents=True)
    (root / "vid").mkdir()
    a = save_png(root / "img" / "view 0#a.png", _gradient())
    b = save_png(root / "img" / "b.png", _gradient(shift=0.5))
    frames = [_gradient(shift=t / 8) for t in range(8)]
    mp4 = save_video(root / "vid" / "turn.mp4", frames, fps=8)
    assert mp4.suffix == ".mp4", "imageio-ffmpeg should be available"
    vids = [mp4] + ([_write_webm(root / "vid" / "turn.webm", frames)] if with_webm else [])
    sections = [
        {"title": "Renders", "text": "two views", "items": [
            {"path": a, "caption": "view 0", "kind": "image"},
            {"path": b, "caption": "view 1", "kind": "image"}]},
        {"title": "Videos", "items": [{"path": v, "caption": v.name, "kind": "video"}
                                      for v in vids]},
        {"title": "Metrics", "items": [
            {"kind": "table", "caption": "fit", "data": {"iou": 0.912345, "steps": 20}},
            {"kind": "text", "caption": "note", "text": "plain <text>"}]},
    ]
    return root, sections


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(header)] + [",".join("" if v is None else str(v) for v in r)
                                  for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- unit tests
def test_links_are_relative_and_survive_moving_the_folder(tmp_path):
    root, sections = _make_site(tmp_path / "a" / "site", with_webm=False)
    page = write_gallery(root / "index.html", "Demo", "intro", sections)
    text = page.read_text()
    assert str(tmp_path) not in text                             # no absolute paths
    moved = tmp_path / "b" / "elsewhere"
    moved.parent.mkdir()
    shutil.move(str(root), str(moved))
    p = _parse((moved / "index.html").read_text())
    assert len(p.srcs) == 3                                      # 2 images + 1 video
    assert "img/view%200%23a.png" in p.srcs                      # URL-quoted, forward slash
    for src in p.srcs:
        assert not src.startswith("/") and "\\" not in src
        assert (moved / unquote(src)).is_file(), src


def test_missing_file_is_an_error_naming_it(tmp_path):
    root, sections = _make_site(tmp_path / "site", with_webm=False)
    sections[1]["items"].append({"path": root / "vid" / "absent.webm", "caption": "x",
                                 "kind": "video"})
    with pytest.raises(FileNotFoundError) as err:
        write_gallery(root / "index.html", "Demo", "", sections)
    assert "absent.webm" in str(err.value) and "Videos" in str(err.value)
    assert not (root / "index.html").exists()
    assert not [f for f in os.listdir(root) if f.endswith(".html")]   # no temp leftovers


def test_text_is_escaped(tmp_path):
    root = tmp_path / "site"
    img = save_png(root / "x.png", _gradient())
    evil = '<script>alert("x")</script> & <b>bold</b>'
    page = write_gallery(root / "index.html", evil, evil, [
        {"title": evil, "text": evil, "items": [
            {"path": img, "caption": evil, "kind": "image"},
            {"kind": "table", "caption": evil, "data": {evil: evil}}]}])
    text = page.read_text()
    assert '<script>alert' not in text and "<b>bold" not in text
    p = _parse(text)
    assert p.scripts == 1                                        # only the load checker
    assert p.captions == [evil, evil]                            # round-trips as text
    assert p.cells == [evil, evil]


def test_table_values_and_kinds(tmp_path):
    root, sections = _make_site(tmp_path / "site", with_webm=False)
    sections[0]["items"][1]["wide"] = True
    text = write_gallery(root / "i.html", "T", "", sections).read_text()
    p = _parse(text)
    assert p.cells == ["iou", "0.9123", "steps", "20"]
    assert text.count('<figure class="image wide">') == 1
    assert text.count('<figure class="image">') == 1
    with pytest.raises(ValueError, match="not an image"):
        write_gallery(root / "j.html", "T", "", [{"title": "s", "items": [
            {"path": root / "vid" / "turn.mp4", "caption": "", "kind": "image"}]}])


def test_read_metrics_concatenates_and_sorts(tmp_path):
    hdr = ["epoch", "step", "train/loss", "train/occ", "val/iou"]
    v1 = _write_csv(tmp_path / "version_1" / "metrics.csv", hdr,
                    [[1, 7, 0.3, 0.2, None], [1, 9, 0.25, 0.1, None], [1, 9, None, None, 0.8]])
    v0 = _write_csv(tmp_path / "version_0" / "metrics.csv", hdr,
                    [[0, 1, 1.0, 0.9, None], [0, 3, 0.5, 0.4, None], [0, 3, None, None, 0.5]])
    cols, rows = read_metrics([v1, v0])
    assert cols == hdr
    assert [r["step"] for r in rows] == [1, 3, 3, 7, 9, 9]
    assert [r["train/loss"] for r in rows if not np.isnan(r["train/loss"])] == \
        [1.0, 0.5, 0.3, 0.25]
    assert [r["val/iou"] for r in rows if not np.isnan(r["val/iou"])] == [0.5, 0.8]

    out = plot_losses([v0, v1], tmp_path / "plots" / "loss.png", "coarse")
    from PIL import Image

    im = np.asarray(Image.open(out).convert("RGB")).astype(int)
    H, W = im.shape[:2]
    assert 250 <= H <= 1500 and 600 <= W <= 2000, (H, W)
    # the lines are drawn: some clearly blue pixels (tab:blue ~ (31,119,180)) and orange markers
    blue = (abs(im - [31, 119, 180]).sum(-1) < 40).sum()
    orange = (abs(im - [255, 127, 14]).sum(-1) < 40).sum()
    assert blue > 50 and orange > 10, (blue, orange)
    assert not [f for f in os.listdir(out.parent) if f != "loss.png"]


def test_plot_losses_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="nope.csv"):
        plot_losses(tmp_path / "nope.csv", tmp_path / "a.png", "t")
    no_step = _write_csv(tmp_path / "a" / "metrics.csv", ["epoch", "train/loss"], [[0, 1.0]])
    with pytest.raises(ValueError, match="no 'step' column"):
        plot_losses(no_step, tmp_path / "a.png", "t")
    empty = _write_csv(tmp_path / "b" / "metrics.csv", ["epoch", "step", "train/loss"],
                       [[0, 1, None], [0, 2, "nan"]])
    with pytest.raises(ValueError, match="no numeric data"):
        plot_losses(empty, tmp_path / "a.png", "t")
    ok = _write_csv(tmp_path / "c" / "metrics.csv", ["epoch", "step", "train/loss"],
                    [[0, 1, 1.0]])
    with pytest.raises(ValueError, match="train/absent"):
        plot_losses(ok, tmp_path / "a.png", "t", keys=["train/absent"])
    assert not (tmp_path / "a.png").exists()


# ----------------------------------------------------------------------------- chromium
def _find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = _find_chromium()
    if exe:
        return exe
    if os.geteuid() != 0 or not Path("/etc/debian_version").exists() \
            or not shutil.which("apt-get"):
        pytest.skip("Chromium not found, and it can only be installed here as root on Debian")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update"], check=True, capture_output=True, timeout=600,
                       env=env)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
                       check=True, capture_output=True, timeout=600, env=env)
    except (subprocess.SubprocessError, OSError) as err:
        tail = getattr(err, "stderr", b"") or b""
        pytest.skip(f"Chromium could not be installed with apt-get: {err} "
                    f"{tail[-300:].decode(errors='replace')}")
    exe = _find_chromium()
    if not exe:
        pytest.skip("Chromium could not be installed: apt-get ran but no binary was found")
    return exe


def _browser_report(chromium: str, page: Path, profile: Path) -> dict:
    """Open the page headless, let virtual time run, return the #load-report JSON."""
    cmd = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
           "--allow-file-access-from-files", "--autoplay-policy=no-user-gesture-required",
           f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--dump-dom",
           page.resolve().as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    p = _parse(res.stdout)
    assert p.body_attrs.get("data-loaded") == "done", res.stdout[-2000:]
    return json.loads(p.report)


@pytest.mark.slow
def test_page_loads_in_headless_chromium(chromium, tmp_path):
    root, sections = _make_site(tmp_path / "a" / "site")
    write_gallery(root / "index.html", "Demo", "intro", sections)
    moved = tmp_path / "moved"
    shutil.move(str(root), str(moved))                           # relative links in a browser
    rep = _browser_report(chromium, moved / "index.html", tmp_path / "profile")
    assert rep == {"ok": True, "images": 2, "videos": 2, "failed": []}

    # negative: garbage bytes in place of one image and the MP4 must be reported as failed
    (moved / "img" / "b.png").write_bytes(b"not a png at all" * 10)
    (moved / "vid" / "turn.mp4").write_bytes(os.urandom(2000))
    rep = _browser_report(chromium, moved / "index.html", tmp_path / "profile")
    assert rep["ok"] is False and (rep["images"], rep["videos"]) == (2, 2)
    assert sorted(rep["failed"]) == ["img/b.png", "vid/turn.mp4"]
