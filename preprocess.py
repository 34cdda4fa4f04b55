"""Preprocess FaceVerse-layout scans: occupancy, surface samples and multi-view renders.

    python preprocess.py --tot 1 --id 0

Method (lib/dataset/preprocessing.py): by default the original GANHead's, `--occ_sampling
vertices` (near-surface occupancy points are jittered scan vertices) and `--colour_source
vertices` (surface-sample colours and RGB renders from per-vertex colours); `--occ_sampling
area` and `--colour_source texture` are this project's alternatives. Changing either redoes
the scans processed with the other.

Shards: `--tot N --id i` processes every N-th scan (from the i-th) of the sorted list of
scan folders, so N instances cover each scan exactly once. Scans whose outputs are already
complete, valid and made from the current sources are skipped; a scan whose sources (OBJ,
.mtl, texture, FLAME pickle) or settings changed since its provenance record was written is
redone, with a line saying what changed; complete outputs without a record are kept as they
are (lib/dataset/preprocessing.py); a folder holding the original GANHead's outputs is never
touched: complete ones are listed as complete with a line saying they were kept as the
original's output (lib/dataset/processed_layout.py). A bad scan prints one line naming it and
the problem and the others go on; the run ends with a summary, the data list CSV (rebuilt
from every complete scan in the output folder, so shards do not clobber each other's rows)
and a non-zero exit status if any scan failed.

Errors that stop the run print one line `preprocess.py: error: ...` and exit with status 2,
leaving an existing data list byte-identical: a scan folder that is missing or holds no scan
folders (a mistyped --scan_folder), a missing FLAME model, and an output folder with no
complete scan at the end (the data list is never rewritten to just its header). Scan folder
names are scan ids and must be safe folder names (lib/dataset/faceverse.validate_scan_id); a
folder with another name is reported as a failed scan.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import sys
import time
from pathlib import Path

DATASET_NAME = "faceverse"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tot", type=int, default=1, help="number of shards")
    p.add_argument("--id", type=int, default=0, help="this shard's index, 0..tot-1")
    p.add_argument("--scan_folder", default="data/faceverse/faceverse_dataset/")
    p.add_argument("--flame_folder", default="data/faceverse/flame_params/")
    p.add_argument("--output_folder", default="data/faceverse/faceverse_processed/")
    p.add_argument("--flame_model", default="data/flame/generic_model.pkl",
                   help="FLAME model (the same default as configs/datamodule/faceverse.yaml)")
    p.add_argument("--data_list", default="data/faceverse/data_list.csv")
    p.add_argument("--views", type=int, default=9)
    p.add_argument("--res", type=int, default=256)
    p.add_argument("--device", default="cpu", help="torch device of the renders")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); use 1 when running several "
                        "shards on one machine")
    p.add_argument("--n_near", type=int, default=100000,
                   help="near-surface occupancy points (70%% face region, 30%% elsewhere)")
    p.add_argument("--n_uniform", type=int, default=100000)
    p.add_argument("--n_surface", type=int, default=100000)
    p.add_argument("--occ_sampling", choices=("vertices", "area"), default="vertices",
                   help="near-surface occupancy points: jittered scan vertices drawn with "
                        "replacement (the original's) or jittered area-weighted surface points")
    p.add_argument("--colour_source", choices=("vertices", "texture"), default="vertices",
                   help="colours of the surface samples and RGB renders: per-vertex colours "
                        "interpolated over the triangles (the original's) or the texture "
                        "sampled at each point's uv")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.tot < 1 or not 0 <= a.id < a.tot:
        p.error(f"need tot >= 1 and 0 <= id < tot (got --tot {a.tot} --id {a.id})")
    if a.views < 1 or a.res < 1:
        p.error("--views and --res must be positive")
    return a


class UsageError(Exception):
    """A problem that stops the run: main prints `preprocess.py: error: <message>`, exits 2."""


def list_scans(scan_folder) -> list[str]:
    """Sorted names of the scan folders (every subfolder that is not hidden is a scan,
    complete or not). Raises UsageError when the folder is missing or holds none."""
    folder = Path(scan_folder)
    if not folder.is_dir():
        raise UsageError(f"scan folder {folder} does not exist (check --scan_folder)")
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise UsageError(f"scan folder {folder} holds no scan folders (<id>/<id>.obj); check "
                         "--scan_folder")
    return names


def shard(names: list[str], tot: int, idx: int) -> list[str]:
    """Every tot-th name from idx on: the shards partition the (sorted) list."""
    return names[idx::tot]


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on `path` (POSIX; a no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_data_list(output_folder, csv_path, n_views, res, sizes) -> list[str]:
    """Rebuild the data list from all complete scans in output_folder (atomic, locked).
    Returns the listed ids. Raises UsageError, leaving the data list untouched, when no
    complete scan is there (a mistyped --output_folder, or every scan failed)."""
    from lib.dataset.faceverse import scan_id_problem
    from lib.dataset.preprocessing import is_complete
    from lib.utils.mesh_io import atomic_path

    csv_path, out = Path(csv_path), Path(output_folder)
    with _locked(csv_path.with_name(f".{csv_path.name}.lock")):
        ids = sorted(d.name for d in out.iterdir() if d.is_dir() and not d.name.startswith(".")
                     and scan_id_problem(d.name) is None
                     and is_complete(d, n_views, res, sizes, deep=False)) if out.is_dir() else []
        if not ids:
            raise UsageError(f"output folder {out} holds no complete scans (for --views "
                             f"{n_views} --res {res}); data list {csv_path} left unchanged "
                             "(check --output_folder and the failures above)")
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["id", "dataset"])
        w.writerows([i, DATASET_NAME] for i in ids)
        with atomic_path(csv_path) as tmp:
            tmp.write_text(buf.getvalue())
    return ids


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"preprocess.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def run(args) -> int:
    from tqdm import tqdm

    from lib.dataset.faceverse import validate_scan_id
    from lib.dataset.preprocessing import Method, SampleSizes, process_scan, scan_paths
    from lib.flame import FLAMEServer

    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    n_face = int(round(args.n_near * 0.7))
    sizes = SampleSizes(n_face=n_face, n_rest=args.n_near - n_face, n_uniform=args.n_uniform,
                        n_surface=args.n_surface)
    method = Method(occ_sampling=args.occ_sampling, colour_source=args.colour_source)
    names = shard(list_scans(args.scan_folder), args.tot, args.id)
    if not Path(args.flame_model).is_file():
        raise UsageError(f"FLAME model {args.flame_model} not found (--flame_model)")
    server = FLAMEServer(args.flame_model).to(args.device)
    out_root = Path(args.output_folder)
    counts = {"done": 0, "skipped": 0, "kept": 0, "original": 0, "failed": 0}
    failures = []
    start = time.perf_counter()
    bar = tqdm(names, desc=f"preprocess shard {args.id}/{args.tot}", unit="scan",
               disable=args.no_progress, dynamic_ncols=True)
    for name in bar:
        scan_dir, _, pkl = scan_paths(args.scan_folder, args.flame_folder, name)
        try:
            validate_scan_id(name, scan_dir)
        except ValueError as e:  # the name cannot be a folder of the output / a data list id
            status, msg = "failed", " ".join(str(e).split())
        else:
            try:
                r = process_scan(scan_dir, pkl, server, out_root / name, args.views, args.res,
                                 sizes=sizes, device=args.device, method=method)
                status, msg = r.status, r.message
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - a bug on one scan must not stop the rest
                status, msg = "failed", (f"unexpected {type(e).__name__}: "
                                         f"{' '.join(str(e).split())}")
        counts[status] += 1
        if status == "failed":
            failures.append(name)
            tqdm.write(f"FAILED {name}: {msg}", file=sys.stderr)
        elif status == "done" and msg:
            tqdm.write(f"{name}: {msg}; reprocessed")
        elif status == "original":
            tqdm.write(f"{name}: {msg}")
        bar.set_postfix(done=counts["done"], skipped=counts["skipped"], kept=counts["kept"],
                        original=counts["original"], failed=counts["failed"])
    bar.close()
    summary = (f"shard {args.id}/{args.tot}: {len(names)} scans in "
               f"{time.perf_counter() - start:.1f} s: {counts['done']} processed, "
               f"{counts['skipped']} already complete, {counts['kept']} kept without a "
               f"provenance record, {counts['failed']} failed"
               f"{(' (' + ', '.join(failures) + ')') if failures else ''}")
    if counts["original"]:
        summary += f", {counts['original']} kept as the original GANHead's outputs"
    try:
        ids = write_data_list(out_root, args.data_list, args.views, args.res, sizes)
    except UsageError:
        print(summary)
        raise
    print(f"{summary}; data list {args.data_list}: {len(ids)} complete scans")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
