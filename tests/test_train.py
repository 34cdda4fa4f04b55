"""End-to-end stage 1 through the real entry point (`train.py`, Hydra + Lightning): a short
run lowers the occupancy loss, writes last.ckpt and a validation picture, resumes with its
optimizer state and epoch, loads as weights; a 2-process DDP run on CPU (gloo) trains."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib.model.checkpoint import read_project_checkpoint

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "+experiments=cpu", "datamodule=synthetic", "logger=csv",
    "datamodule.batch_size=2", "datamodule.points_per_frame=300", "datamodule.repeat=4",
    "datamodule.val_points=1000", "datamodule.val_subjects=1",
    "model.generator.base_channels=32", "model.generator.channels=[16,8,8]",
    "model.occ_network.width=64", "model.deformer.lbs_network.width=32",
    "model.deformer.disp_network.width=32", "model.norm_network.width=64",
    "model.tex_network.width=64", "model.deformer.max_steps=10",
    "model.validation.mesh_res_final=32", "model.validation.n_pictures=1",
    "model.optim.lr=3e-3", "trainer.check_val_every_n_epoch=100",
    "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
]


def run_train(data: dict, out: Path, *extra: str, timeout: int = 600) -> None:
    args = [sys.executable, str(ROOT / "train.py"), *TINY,
            f"datamodule.processed_dir={data['processed']}",
            f"datamodule.data_list={data['data_list']}",
            f"datamodule.flame_model={data['flame']}",
            f"output_dir={out}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]


def read_metric(out: Path, key: str) -> list[tuple[int, float]]:
    rows = []
    for path in sorted(out.glob("logs/version_*/metrics.csv")):
        with open(path) as fh:
            for row in csv.DictReader(fh):
                if row.get(key):
                    rows.append((int(row["step"]), float(row[key])))
    return rows


@pytest.mark.slow
def test_stage1_trains_checkpoints_and_resumes(tiny_dataset, tmp_path):
    out = tmp_path / "coarse"
    run_train(tiny_dataset, out, "trainer.max_epochs=6", "trainer.check_val_every_n_epoch=6")
    ckpt = out / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    occ = [v for _, v in read_metric(out, "train/occ")]
    assert len(occ) >= 6
    first, last = sum(occ[:3]) / 3, sum(occ[-3:]) / 3
    assert last < first, f"occupancy loss did not decrease: {occ}"
    assert list((out / "medias").glob("*.png")), "no validation picture"
    iou = read_metric(out, "val/iou")
    assert iou and 0.0 <= iou[-1][1] <= 1.0

    state = read_project_checkpoint(ckpt)
    assert state["epoch"] >= 5 and state["optimizer_states"]
    run_train(tiny_dataset, out, "trainer.max_epochs=7", "resume=true")
    resumed = read_project_checkpoint(ckpt)
    assert resumed["epoch"] == state["epoch"] + 1
    assert resumed["global_step"] > state["global_step"]

    # the checkpoint loads as a plain module (as precompute and test.py do)
    from lib.model.ganhead import GANHead

    model = GANHead.load_from_checkpoint(ckpt, map_location="cpu",
                                         flame_model=str(tiny_dataset["flame"]))
    assert model.z_shapes.weight.shape[0] == 2

    # FLAME's arrays are not in the checkpoint (licence, size); the head model's fingerprint is
    assert not [k for k in resumed["state_dict"] if k.startswith("flame_server.")]
    assert resumed["flame_fingerprint"]["n_vertices"] == model.flame_server.flame.num_vertices
    # a checkpoint written while they were persistent still loads
    older = dict(resumed, state_dict=dict(resumed["state_dict"]))
    del older["flame_fingerprint"]
    for name, buf in model.flame_server.flame.named_buffers():
        older["state_dict"][f"flame_server.flame.{name}"] = buf.clone()
    torch.save(older, tmp_path / "older.ckpt")
    again = GANHead.load_from_checkpoint(tmp_path / "older.ckpt", map_location="cpu",
                                         flame_model=str(tiny_dataset["flame"]))
    torch.testing.assert_close(again.z_shapes.weight, model.z_shapes.weight)
    # another head model file is refused, naming it
    from lib.synthetic.head_model import build_head_model, save_head_model

    other = tmp_path / "other_model.pkl"
    save_head_model(build_head_model(seed=1), other)
    with pytest.raises(ValueError, match="other_model.pkl is not the one this checkpoint"):
        GANHead.load_from_checkpoint(ckpt, map_location="cpu", flame_model=str(other))


@pytest.mark.slow
def test_killed_run_keeps_its_epoch_checkpoint_and_resumes(tiny_dataset, tmp_path):
    """last.ckpt is written after every epoch, not only when training ends: a run killed
    mid-training leaves a readable checkpoint, and resume=true continues from its epoch."""
    import signal
    import time

    out = tmp_path / "killed"
    ckpt = out / "checkpoints" / "last.ckpt"
    args = [sys.executable, str(ROOT / "train.py"), *TINY,
            f"datamodule.processed_dir={tiny_dataset['processed']}",
            f"datamodule.data_list={tiny_dataset['data_list']}",
            f"datamodule.flame_model={tiny_dataset['flame']}",
            f"output_dir={out}", "trainer.max_epochs=1000"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 240
        while not ckpt.is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert ckpt.is_file(), "no checkpoint while training: " + (
            proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "still running")
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    state = read_project_checkpoint(ckpt)
    epoch = state["epoch"]
    assert epoch < 999 and state["optimizer_states"]
    run_train(tiny_dataset, out, f"trainer.max_epochs={epoch + 2}", "resume=true")
    resumed = read_project_checkpoint(ckpt)
    assert resumed["epoch"] > epoch and resumed["global_step"] > state["global_step"]


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(tiny_dataset, tmp_path):
    out = tmp_path / "ddp"
    run_train(tiny_dataset, out, "trainer.max_epochs=1", "trainer.devices=2",
              "trainer.strategy=ddp", "trainer.accelerator=cpu", "datamodule.repeat=2")
    ckpt = out / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    from lib.model.ganhead import GANHead

    model = GANHead.load_from_checkpoint(ckpt, map_location="cpu",
                                         flame_model=str(tiny_dataset["flame"]))
    assert torch.isfinite(model.z_shapes.weight).all()


def test_atomic_checkpoint_io_keeps_the_old_file_when_a_save_fails(tmp_path, monkeypatch):
    """AtomicCheckpointIO writes through a temporary file: a save interrupted half-way through
    writing (simulated: Lightning's writer writes half the bytes, then raises) leaves the previous
    checkpoint readable and no temporary file behind; a good save replaces it."""
    import io as _io

    import lightning_fabric.plugins.io.torch_io as torch_io

    from lib.utils.checkpoint_io import AtomicCheckpointIO

    ckpt_io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    ckpt_io.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    real_save = torch_io._atomic_save

    def interrupted(checkpoint, filepath):
        buf = _io.BytesIO()
        torch.save(checkpoint, buf)
        with open(filepath, "wb") as fh:
            fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch_io, "_atomic_save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt_io.save_checkpoint({"epoch": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.setattr(torch_io, "_atomic_save", real_save)
    assert ckpt_io.load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    ckpt_io.save_checkpoint({"epoch": 3}, path)
    assert ckpt_io.load_checkpoint(path)["epoch"] == 3
