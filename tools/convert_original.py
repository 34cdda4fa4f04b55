"""Convert a checkpoint of the original GANHead code (e.g. the released stage-1/stage-2
models) into a checkpoint of this project (README: Using the released checkpoints).

    python tools/convert_original.py --ckpt outputs/stage2_model/checkpoints/last.ckpt \
        --out outputs/released_fine/checkpoints/last.ckpt \
        --flame_model data/flame/generic_model.pkl --data_list faceverse.csv [--stage fine]

Nothing in the input file runs (lib/model/original_checkpoint.py reads it with inert
placeholders for its classes). Every tensor is mapped, dropped for a stated reason (the
FLAME copies after checking them against --flame_model, the generator's unused last
modulation layer) or refused with an error naming it. The latent rows keep the original's
order, which is its data list's; the scan ids are stored with them. The result is written
atomically and loads in test.py, precompute.py and as train.py starting_path=.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="the original's Lightning checkpoint")
    ap.add_argument("--out", required=True, help="where to write this project's checkpoint")
    ap.add_argument("--flame_model", required=True,
                    help="the FLAME file the original was trained with (generic_model.pkl)")
    ap.add_argument("--data_list", required=True,
                    help="the original's data list CSV (its lib/dataset/faceverse.csv for the "
                         "released models): line i names the scan of latent row i")
    ap.add_argument("--stage", choices=("coarse", "fine"), default=None,
                    help="insist on a stage (default: inferred from the tensors present)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)

    import torch

    from lib.model.original_checkpoint import convert_original
    from lib.utils.atomic import atomic_path
    from lib.utils.checkpoint_io import CheckpointError

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"[convert] {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 1
    try:
        checkpoint, report = convert_original(args.ckpt, args.flame_model, args.data_list,
                                              stage=args.stage)
    except CheckpointError as err:
        print(f"[convert] {err}", file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        torch.save(checkpoint, tmp)
    for line in report.lines():
        print(f"[convert] {line}")
    stage = report.stage
    print(f"[convert] wrote {out} ({len(checkpoint['hyper_parameters']['scan_ids'])} scans)")
    print(f"[convert] e.g.: python test.py eval_mode=sample ckpt={out}"
          + (" +experiments=fine" if stage == "fine" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
