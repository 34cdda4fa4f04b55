"""Use a trained GANHead (Hydra 1.3): sample, control, reenact, fit (docs/design.md, Inference).

    python test.py expname=fine +experiments=fine eval_mode=sample test.sample.n_samples=8
    python test.py expname=fine +experiments=fine eval_mode=z_color subject=0 subject_b=3
    python test.py expname=fine +experiments=fine eval_mode=reenact subject=001_02 \\
        motion=data/synthetic/motion/flame_params.json test.save_meshes=true
    python test.py expname=fine +experiments=fine eval_mode=fit scan=my_scan.obj [flame=x.pkl]

eval_mode: sample | interp | z_shape | z_detail | z_color | betas | thetas | reenact | fit.
The checkpoint is `ckpt=PATH` (default ${output_dir}/checkpoints/last.ckpt; `checkpoint` is
taken by the training callback's settings); outputs go to
${output_dir}/<eval_mode>/ with a summary.json. Colour modes need a stage-2 checkpoint
(z_shape, betas, thetas and fit of an untextured scan also take stage 1). Option defaults and
meanings: the `test:` block of configs/config.yaml, one sub-block per runner (test.sample,
test.control, test.reenact, test.fit), each read into that runner's typed options (`mode_options`).
"""
from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

MODES = ("sample", "interp", "z_shape", "z_detail", "z_color", "betas", "thetas", "reenact",
         "fit")
NEEDS_STAGE2 = ("sample", "interp", "z_detail", "z_color", "reenact")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def avatar_codes(model, cfg: DictConfig, which: str, default_row: int | None
                 ) -> tuple[dict, str, int | None]:
    """Codes of avatar `which` ('subject' or 'subject_b'): the training subject named in the
    config, else row `default_row`, else (None) a sampled avatar.
    Returns (codes, display name, embedding row or None for a sample)."""
    from lib.inference.loading import resolve_subject, subject_codes
    from lib.inference.sampling import sample_codes

    choice = cfg.get(which)
    if choice is None and default_row is None:
        codes = sample_codes(model, 1, cfg.test.sample.std_scale, cfg.seed,
                             covariance=cfg.test.sample.covariance)[0]
        return codes, f"sample (seed {cfg.seed})", None
    subject = resolve_subject(model, default_row if choice is None else choice,
                              cfg.datamodule.get("data_list"), cfg.datamodule.get("processed_dir"),
                              option=which)
    return subject_codes(model, subject), subject.name, subject.index


def load_motion_option(cfg: DictConfig, required: bool):
    from lib.dataset.motion import load_motion
    from lib.inference.loading import InferenceError

    if cfg.motion is None:
        if required:
            raise InferenceError(f"eval_mode={cfg.eval_mode} needs motion=<flame_params.json "
                                 "or .npz>")
        return None
    return load_motion(cfg.motion)


def mode_options(cfg: DictConfig, mode: str):
    """The typed options of eval_mode `mode`, from its block of `test` (checked before the
    checkpoint loads: an unknown key or a wrong type is an InferenceError)."""
    if mode == "sample":
        from lib.inference.sampling import SampleOptions

        return SampleOptions.from_config(cfg.test.sample)
    if mode == "reenact":
        from lib.inference.reenact import ReenactOptions

        return ReenactOptions.from_config(cfg.test.reenact)
    if mode == "fit":
        from lib.inference.fitting import FitOptions

        return FitOptions.from_config(cfg.test.fit)
    from lib.inference.control import ControlOptions

    return ControlOptions.from_config(cfg.test.control)


def run(cfg: DictConfig) -> dict:
    from lib.inference.loading import InferenceError, load_model, require_stage2
    from lib.utils.checkpoint_io import last_checkpoint

    mode = str(cfg.eval_mode)
    if mode not in MODES:
        raise InferenceError(f"eval_mode={mode!r} is not one of {', '.join(MODES)}")
    opts = mode_options(cfg, mode)
    ckpt = Path(cfg.ckpt) if cfg.ckpt else last_checkpoint(cfg.output_dir)
    flame_model = cfg.datamodule.get("flame_model")
    if flame_model is not None and not Path(flame_model).is_file():
        flame_model = None  # keep the FLAME path stored in the checkpoint
    model = load_model(ckpt, flame_model, pick_device(cfg.test.device))
    if mode in NEEDS_STAGE2:
        require_stage2(model, f"eval_mode={mode}")
    out_dir = Path(cfg.output_dir) / mode
    torch.manual_seed(int(cfg.seed))
    n_subjects = model.z_shapes.num_embeddings

    if mode == "sample":
        from lib.inference.sampling import run_sample

        return run_sample(model, out_dir, opts, motion=load_motion_option(cfg, False))
    if mode == "reenact":
        from lib.inference.avatar import Avatar
        from lib.inference.reenact import run_reenact

        motion = load_motion_option(cfg, True)
        codes, name, _ = avatar_codes(model, cfg, "subject", None)
        avatar = Avatar.from_codes(model, codes, mesh_res=opts.mesh_res)
        return run_reenact(model, avatar, motion, out_dir, opts, name=name)
    if mode == "fit":
        from lib.inference.fitting import run_fit

        if cfg.scan is None:
            raise InferenceError("eval_mode=fit needs scan=<mesh file> (and optionally "
                                 "flame=<id>_flame.pkl)")
        return run_fit(model, cfg.scan, out_dir, opts, flame_path=cfg.flame,
                       processed_dir=cfg.datamodule.get("processed_dir"),
                       data_list=cfg.datamodule.get("data_list"))

    from lib.inference.control import run_control

    a, name_a, row_a = avatar_codes(model, cfg, "subject", 0)
    b, name_b = None, ""
    if mode in ("interp", "z_shape", "z_detail", "z_color"):
        # the other end: subject_b, else the next training subject, else (one subject) a sample
        row_b = (row_a + 1) % n_subjects if n_subjects > 1 else None
        b, name_b, _ = avatar_codes(model, cfg, "subject_b", row_b)
    return run_control(model, mode, out_dir, a, b, opts, names=(name_a, name_b))


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from lib.dataset.faceverse import DataListError
    from lib.dataset.faceverse_io import FlameParamsError
    from lib.dataset.motion import MotionFormatError
    from lib.flame.loader import FlameModelError
    from lib.inference.loading import InferenceError
    from lib.utils.atomic import atomic_path
    from lib.utils.checkpoint_io import CheckpointError

    try:
        summary = run(cfg)
    except (InferenceError, MotionFormatError, FlameParamsError, DataListError, FlameModelError,
            CheckpointError) as err:
        raise SystemExit(f"test.py: error: {' '.join(str(err).split())}") from None
    out = Path(cfg.output_dir) / str(cfg.eval_mode) / "summary.json"
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2,
                     default=str)[:4000])
    print(f"test.py: eval_mode={cfg.eval_mode} done -> {out.parent}")


if __name__ == "__main__":
    main()
