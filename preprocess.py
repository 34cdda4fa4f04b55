"""Preprocess FaceVerse-layout scans: occupancy, surface samples and multi-view renders.

    python preprocess.py --tot 1 --id 0

Shards: `--tot N --id i` processes every N-th scan (from the i-th) of the sorted list of
scan folders, so N instances cover each scan exactly once. Scans whose outputs are already
complete and valid are skipped; a bad scan prints one line naming it and the problem and
the others go on; the run ends with a summary, the data list CSV (rebuilt from every
complete scan in the output folder, so shards do not clobber each other's rows) and a
non-zero exit status if any scan failed.
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
    p.add_argument("--flame_model", default="lib/flame/flame_model/generic_model.pkl")
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
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.tot < 1 or not 0 <= a.id < a.tot:
        p.error(f"need tot >= 1 and 0 <= id < tot (got --tot {a.tot} --id {a.id})")
    if a.views < 1 or a.res < 1:
        p.error("--views and --res must be positive")
    return a


def list_scans(scan_folder) -> list[str]:
    """Sorted names of the scan folders (every subfolder is a scan, complete or not)."""
    folder = Path(scan_folder)
    if not folder.is_dir():
        raise SystemExit(f"error: scan folder {folder} does not exist")
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


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
    Returns the listed ids."""
    from lib.dataset.preprocessing import is_complete
    from lib.utils.mesh_io import atomic_path

    csv_path, out = Path(csv_path), Path(output_folder)
    with _locked(csv_path.with_name(f".{csv_path.name}.lock")):
        ids = sorted(d.name for d in out.iterdir() if d.is_dir() and not d.name.startswith(".")
                     and is_complete(d, n_views, res, sizes, deep=False)) if out.is_dir() else []
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["id", "dataset"])
        w.writerows([i, DATASET_NAME] for i in ids)
        with atomic_path(csv_path) as tmp:
            tmp.write_text(buf.getvalue())
    return ids


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from lib.dataset.preprocessing import SampleSizes, process_scan, scan_paths
    from lib.flame import FLAMEServer

    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    n_face = int(round(args.n_near * 0.7))
    sizes = SampleSizes(n_face=n_face, n_rest=args.n_near - n_face, n_uniform=args.n_uniform,
                        n_surface=args.n_surface)
    names = shard(list_scans(args.scan_folder), args.tot, args.id)
    if not Path(args.flame_model).is_file():
        print(f"error: FLAME model {args.flame_model} not found (--flame_model)", file=sys.stderr)
        return 2
    server = FLAMEServer(args.flame_model).to(args.device)
    out_root = Path(args.output_folder)
    counts = {"done": 0, "skipped": 0, "failed": 0}
    failures = []
    start = time.perf_counter()
    bar = tqdm(names, desc=f"preprocess shard {args.id}/{args.tot}", unit="scan",
               disable=args.no_progress, dynamic_ncols=True)
    for name in bar:
        scan_dir, _, pkl = scan_paths(args.scan_folder, args.flame_folder, name)
        try:
            r = process_scan(scan_dir, pkl, server, out_root / name, args.views, args.res,
                             sizes=sizes, device=args.device)
            status, msg = r.status, r.message
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - a bug on one scan must not stop the rest
            status, msg = "failed", f"unexpected {type(e).__name__}: {' '.join(str(e).split())}"
        counts[status] += 1
        if status == "failed":
            failures.append(name)
            tqdm.write(f"FAILED {name}: {msg}", file=sys.stderr)
        bar.set_postfix(done=counts["done"], skipped=counts["skipped"], failed=counts["failed"])
    bar.close()
    ids = write_data_list(out_root, args.data_list, args.views, args.res, sizes)
    print(f"shard {args.id}/{args.tot}: {len(names)} scans in {time.perf_counter() - start:.1f} s:"
          f" {counts['done']} processed, {counts['skipped']} already complete,"
          f" {counts['failed']} failed{(' (' + ', '.join(failures) + ')') if failures else ''};"
          f" data list {args.data_list}: {len(ids)} complete scans")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
