"""Files you can trust (README): no code runs from a checkpoint, a finished run is not
overwritten, subjects and stage-2 caches resolve through what the files record.

Payloads are made in the tests: a pickled `__reduce__` that would create a marker file, and
Hydra `_target_` entries (top-level and nested) that would call `os.system`. Each is refused
with a clear error, and the marker never appears.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import ROOT, TINY

NETS = [o for o in TINY if not o.startswith("+experiments")]


class _Payload:
    """Pickles to `os.system(command)`: loading it with plain pickle would run the command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _model(flame: Path, scan_ids: list[str], seed: int = 0):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lib.model.ganhead import GANHead

    torch.manual_seed(seed)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "+experiments=cpu", *NETS, f"datamodule.flame_model={flame}"])
    return GANHead(scan_ids=scan_ids, output_dir="unused",
                   **OmegaConf.to_container(cfg.model, resolve=True))


def _save(model, path: Path, **extra) -> Path:
    """A checkpoint as Lightning writes it for this module (the keys load_ganhead reads)."""
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
            "epoch": 3, "global_step": 30, **extra}
    model.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def saved(head_model_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    model = _model(head_model_path, ["001_01", "002_01"])
    return {"model": model, "ckpt": _save(model, root / "good.ckpt"), "root": root}


def _run(script: str, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / script), *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)


def _data_overrides(data: dict) -> list[str]:
    return [f"datamodule.processed_dir={data['processed']}",
            f"datamodule.data_list={data['data_list']}",
            f"datamodule.flame_model={data['flame']}"]


# ---------------------------------------------------------------------------- 1: no code runs
@pytest.mark.slow
def test_pickled_payload_is_refused_and_never_runs(saved, tiny_dataset, tmp_path):
    from lib.model.checkpoint import load_ganhead
    from lib.utils.checkpoint_io import AtomicCheckpointIO, CheckpointError, read_checkpoint

    marker = tmp_path / "pwned"
    ckpt = torch.load(saved["ckpt"], weights_only=True)
    ckpt["callbacks"] = {"x": _Payload(f"touch {marker}")}
    bad = tmp_path / "pickled.ckpt"
    torch.save(ckpt, bad)
    for load in (read_checkpoint, load_ganhead, AtomicCheckpointIO().load_checkpoint):
        with pytest.raises(CheckpointError, match=r"refused.*pickled objects.*GLOBAL \w+\.system"):
            load(bad)
    assert not marker.exists()

    # the entry points: one line, non-zero exit, nothing ran
    res = _run("train.py", "+experiments=cpu", "datamodule=synthetic", *NETS,
               *_data_overrides(tiny_dataset), f"output_dir={tmp_path / 'run'}",
               f"starting_path={bad}")
    assert res.returncode == 1 and not marker.exists()
    assert res.stderr.strip().splitlines()[-1].startswith(f"train.py: error: {bad}: refused")
    assert not (tmp_path / "run").exists()  # nothing written, not even Hydra's log folder
    res = _run("test.py", "eval_mode=z_shape", f"ckpt={bad}", f"output_dir={tmp_path / 't'}",
               f"datamodule.flame_model={tiny_dataset['flame']}")
    assert res.returncode == 1 and not marker.exists()
    assert "test.py: error:" in res.stderr and "refused" in res.stderr


@pytest.mark.parametrize("where", ["occ_network", "width", "generator", "allowed_nested",
                                   "deformer", "deformer_network", "deformer_derived",
                                   "deformer_mode_and_target", "deformer_mode"])
def test_target_in_hyper_parameters_is_refused(saved, tmp_path, where):
    from lib.model.checkpoint import load_ganhead
    from lib.utils.checkpoint_io import CheckpointError

    marker = tmp_path / "pwned"
    payload = {"_target_": "os.system", "command": f"touch {marker}"}
    ckpt = torch.load(saved["ckpt"], weights_only=True)
    hp = ckpt["hyper_parameters"]
    if where == "occ_network":  # the whole network entry replaced
        hp["occ_network"] = payload
    elif where == "width":  # hidden inside a width value
        hp["occ_network"]["width"] = payload
    elif where == "generator":
        hp["generator"]["channels"] = [payload]
    elif where == "allowed_nested":  # an allow-listed target where a number belongs
        hp["deformer"]["lbs_network"]["width"] = {"_target_": "lib.model.networks.LBSNetwork"}
    elif where == "deformer":  # the deformer's class replaced by a callable
        hp["deformer"].update(payload)
    elif where == "deformer_network":  # allowed as a network, not as the deformer
        hp["deformer"]["_target_"] = "lib.model.networks.LBSNetwork"
    elif where == "deformer_derived":  # the model derives the fast deformer's box
        hp["deformer"]["bbox_min"] = [-9.0, -9.0, -9.0]
    elif where == "deformer_mode_and_target":  # old and new way at once: ambiguous
        hp["deformer"]["mode"] = "exact"
    else:  # an old checkpoint's mode that never existed
        hp["deformer"].pop("_target_")
        hp["deformer"]["mode"] = "os.system"
    bad = tmp_path / "target.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match="refused") as err:
        load_ganhead(bad)
    assert str(bad) in str(err.value)
    assert not marker.exists()
    why = {"deformer": "deformer names a code target (_target_: 'os.system')",
           "deformer_network": "model.deformer: _target_ 'lib.model.networks.LBSNetwork' is "
                               "not one of this project's deformers",
           "deformer_derived": "model.deformer.bbox_min is derived",
           "deformer_mode_and_target": "or by the old mode key, not both",
           "deformer_mode": "model.deformer.mode must be one of exact, fast, got 'os.system'"}
    assert why.get(where, "") in str(err.value)


@pytest.mark.slow
def test_the_allow_list_comes_from_the_caller(saved, tmp_path):
    """lib/utils/checkpoint_io allows no `_target_` unless its caller names it: a real
    checkpoint (network entries with the builders' targets) is refused by the bare reader and
    read by lib/model/checkpoint.py's reader and the train.py plugin given PROJECT_TARGETS; an
    outside target is refused by all of them."""
    from lib.model.checkpoint import PROJECT_TARGETS, read_project_checkpoint
    from lib.utils.checkpoint_io import AtomicCheckpointIO, CheckpointError, read_checkpoint

    good = saved["ckpt"]
    for load in (read_checkpoint, AtomicCheckpointIO().load_checkpoint):
        with pytest.raises(CheckpointError, match="refused.*names a code target"):
            load(good)
    for load in (read_project_checkpoint, AtomicCheckpointIO(PROJECT_TARGETS).load_checkpoint,
                 lambda p: read_checkpoint(p, allowed_targets=PROJECT_TARGETS)):
        assert load(good)["epoch"] == 3
    ckpt = torch.load(good, weights_only=True)
    ckpt["hyper_parameters"]["occ_network"] = {"_target_": "os.system", "command": "true"}
    bad = tmp_path / "outside.ckpt"
    torch.save(ckpt, bad)
    for load in (read_project_checkpoint, AtomicCheckpointIO(PROJECT_TARGETS).load_checkpoint):
        with pytest.raises(CheckpointError, match="refused.*os.system"):
            load(bad)
    # and the reader's module imports nothing of lib/model (a lower layer)
    res = subprocess.run([sys.executable, "-c", "import sys, lib.utils.checkpoint_io; "
                          "print(sorted(m for m in sys.modules if m.startswith('lib.model')))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr[-2000:]


@pytest.mark.slow
def test_target_payload_through_test_py(saved, tiny_dataset, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = torch.load(saved["ckpt"], weights_only=True)
    ckpt["hyper_parameters"]["norm_network"]["depth"] = {"_target_": "os.system",
                                                         "command": f"touch {marker}"}
    bad = tmp_path / "hp.ckpt"
    torch.save(ckpt, bad)
    res = _run("test.py", "eval_mode=z_shape", f"ckpt={bad}", f"output_dir={tmp_path / 't'}",
               f"datamodule.flame_model={tiny_dataset['flame']}")
    assert res.returncode == 1, res.stdout[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("test.py: error:") and "os.system" in last and "refused" in last
    assert not marker.exists()


def test_good_checkpoint_loads_with_ids_and_builders(saved, head_model_path):
    from lib.model.builders import NetworkConfigError, build_network
    from lib.model.checkpoint import load_ganhead

    model = load_ganhead(saved["ckpt"])
    for (k, a), b in zip(model.state_dict().items(), saved["model"].state_dict().values()):
        assert torch.equal(a, b), k
    assert model.scan_ids == ["001_01", "002_01"]
    assert model.subject_rows(["002_01", "001_01"]).tolist() == [1, 0]
    with pytest.raises(KeyError, match="003_01"):
        model.subject_rows(["003_01"])
    with pytest.raises(NetworkConfigError, match="not one of this project's network builders"):
        build_network({"_target_": "torch.nn.Linear", "in_features": 3}, "model.occ_network")
    with pytest.raises(NetworkConfigError, match="takes no argument 'bogus'"):
        build_network({"_target_": "lib.model.networks.build_geometry_network", "bogus": 1},
                      "model.occ_network")


@pytest.mark.parametrize("mode", ["exact", "fast", None])
def test_checkpoint_from_before_the_deformer_group_loads(saved, tmp_path, mode):
    """Checkpoints written before configs/deformer/ name the deformer by `mode` (absent:
    exact), with only the arguments the class takes; they load as that class, same weights."""
    import inspect

    from lib.model.checkpoint import load_ganhead
    from lib.model.deformer import ForwardDeformer
    from lib.model.fast_deformer import FastForwardDeformer

    ckpt = torch.load(saved["ckpt"], weights_only=True)
    entry = ckpt["hyper_parameters"]["deformer"]
    assert entry.pop("_target_") == "lib.model.fast_deformer.FastForwardDeformer"  # cpu
    if mode != "fast":
        exact_args = set(inspect.signature(ForwardDeformer).parameters)
        for key in [k for k in entry if k not in exact_args | {"lbs_network", "disp_network"}]:
            entry.pop(key)
    if mode is not None:
        entry["mode"] = mode
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    model = load_ganhead(old)
    assert type(model.deformer) is (FastForwardDeformer if mode == "fast" else ForwardDeformer)
    assert model.deformer.max_steps == entry["max_steps"] == saved["model"].deformer.max_steps
    for (k, a), b in zip(model.state_dict().items(), saved["model"].state_dict().values()):
        assert torch.equal(a, b), k


def test_truncated_and_foreign_files_are_one_line_errors(saved, tmp_path):
    from lib.model.checkpoint import load_ganhead
    from lib.utils.checkpoint_io import CheckpointError

    data = saved["ckpt"].read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_ganhead(cut)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, foreign)
    with pytest.raises(CheckpointError, match="not a checkpoint of this project's train.py"):
        load_ganhead(foreign)
    # stored scan ids become folder names in test.py: a path-like id is refused on load
    ckpt = torch.load(saved["ckpt"], weights_only=True)
    ckpt["hyper_parameters"]["scan_ids"] = ["../../etc", "002_01"]
    bad_ids = tmp_path / "ids.ckpt"
    torch.save(ckpt, bad_ids)
    with pytest.raises(CheckpointError, match=r"ids.ckpt: stored: scan id '../../etc' contains "
                                              "a path separator"):
        load_ganhead(bad_ids)


def test_flame_fingerprint_covers_the_joint_regressor(saved, head_model_path, tmp_path):
    """A head model whose joint regressor differs (two joints swapped) is refused."""
    import pickle

    from lib.model.checkpoint import load_ganhead
    from lib.utils.checkpoint_io import CheckpointError

    with open(head_model_path, "rb") as fh:
        model = pickle.load(fh)  # the synthetic model is plain numpy/scipy
    jr = model["J_regressor"]
    jr = jr.toarray() if hasattr(jr, "toarray") else np.asarray(jr)
    model["J_regressor"] = jr[[0, 2, 1, 3, 4]]
    other = tmp_path / "swapped_joints.pkl"
    with open(other, "wb") as fh:
        pickle.dump(model, fh)
    with pytest.raises(CheckpointError, match="J_regressor_sum"):
        load_ganhead(saved["ckpt"], flame_model=str(other))


# ---------------------------------------------------------------------------- 2: no overwrite
@pytest.mark.slow
def test_finished_run_is_not_overwritten(tiny_dataset, tmp_path):
    out = tmp_path / "coarse"
    (out / "checkpoints").mkdir(parents=True)
    last = out / "checkpoints" / "last.ckpt"
    last.write_bytes(b"a finished 30-epoch run")
    (out / "config.yaml").write_text("the finished run's config\n")
    base = ["+experiments=cpu", "datamodule=synthetic", *NETS, *_data_overrides(tiny_dataset),
            f"output_dir={out}", "trainer.max_epochs=1", "datamodule.repeat=1"]
    res = _run("train.py", *base)
    assert res.returncode == 1
    msg = res.stderr.strip().splitlines()[-1]
    assert msg.startswith("train.py: error:") and "resume=true" in msg and "overwrite=true" in msg
    assert last.read_bytes() == b"a finished 30-epoch run"
    assert (out / "config.yaml").read_text() == "the finished run's config\n"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml"]

    # an option that fails at once leaves config.yaml as it was
    res = _run("train.py", *base, "overwrite=true", "datamodule.batch_size=0")
    assert res.returncode == 1 and "datamodule.batch_size=0 must be >= 1" in res.stderr
    assert (out / "config.yaml").read_text() == "the finished run's config\n"
    # resume=true without a checkpoint: one line
    res = _run("train.py", "+experiments=cpu", "datamodule=synthetic", *NETS,
               *_data_overrides(tiny_dataset), f"output_dir={tmp_path / 'none'}", "resume=true")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("train.py: error: resume=true but")

    # overwrite=true replaces it (and writes the config once training starts)
    res = _run("train.py", *base, "overwrite=true")
    assert res.returncode == 0, res.stderr[-3000:]
    from lib.model.checkpoint import read_project_checkpoint

    assert read_project_checkpoint(last)["epoch"] == 0
    assert "output_dir" in (out / "config.yaml").read_text()


@pytest.mark.slow
def test_missing_scan_files_found_before_training(tiny_dataset, tmp_path):
    data_list = tmp_path / "list.csv"
    data_list.write_text("id,dataset\n001_01,synthetic\n404_01,synthetic\n")
    res = _run("train.py", "+experiments=cpu", "datamodule=synthetic", *NETS,
               f"datamodule.processed_dir={tiny_dataset['processed']}",
               f"datamodule.data_list={data_list}",
               f"datamodule.flame_model={tiny_dataset['flame']}", f"output_dir={tmp_path / 'o'}")
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"train.py: error: {data_list}:") and "404_01/occupancy.npz" in last
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- 3: provenance
@pytest.mark.slow
def test_resume_and_starting_path_match_rows_by_scan_id(saved, head_model_path, tiny_dataset,
                                                        tmp_path):
    import train

    a = saved["model"]
    b = _model(head_model_path, ["002_01", "001_01"], seed=1)  # the same scans, other order
    train.load_weights(b, str(saved["ckpt"]))
    torch.testing.assert_close(b.z_shapes.weight[0], a.z_shapes.weight[1], rtol=0, atol=0)
    torch.testing.assert_close(b.z_shapes.weight[1], a.z_shapes.weight[0], rtol=0, atol=0)
    c = _model(head_model_path, ["001_01", "007_03"])
    with pytest.raises(train.TrainError, match=r"\['007_03'\]"):
        train.load_weights(c, str(saved["ckpt"]))

    # resume=true into a run trained on other scans stops, naming them
    other = _model(head_model_path, ["001_01", "009_09"])
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    _save(other, out / "checkpoints" / "last.ckpt")
    res = _run("train.py", "+experiments=cpu", "datamodule=synthetic", *NETS,
               *_data_overrides(tiny_dataset), f"output_dir={out}", "resume=true")
    assert res.returncode == 1
    assert "009_09" in res.stderr and "002_01" in res.stderr and "train.py: error:" in res.stderr


def test_subjects_resolve_through_the_checkpoint_ids(saved, tmp_path):
    from lib.inference.loading import InferenceError, resolve_subject

    model = saved["model"]
    # a data list of the same length with one id changed: the checkpoint's ids win
    wrong = tmp_path / "list.csv"
    wrong.write_text("id,dataset\n000_01,x\n002_01,x\n")
    assert resolve_subject(model, "002_01", wrong).index == 1
    assert resolve_subject(model, "001_01", wrong).index == 0
    with pytest.raises(InferenceError, match="subject_b='000_01' is not among the checkpoint"):
        resolve_subject(model, "000_01", wrong, option="subject_b")


def test_cache_status_records_sources(tmp_path):
    from lib.dataset.cache_file import cache_record, cache_status, write_cache
    from lib.utils.mesh_io import save_npz

    params = np.arange(169, dtype=np.float32)
    rec = cache_record("g1", params, 32, "a.ckpt")
    path = tmp_path / "001_01.npz"
    write_cache(path, np.zeros((9, 8, 8, 4)), np.zeros((9, 169)), rec)
    assert cache_status(path, 9, 8, rec) == ("ok", "")
    assert cache_status(path, 9, 16, rec)[0] == "missing"
    status, why = cache_status(path, 9, 8, cache_record("g2", params, 32))
    assert status == "stale" and "another stage-1 model" in why
    status, why = cache_status(path, 9, 8, cache_record("g1", params + 1, 32))
    assert status == "stale" and "FLAME parameters" in why
    old = tmp_path / "old.npz"
    save_npz(old, cache=np.zeros((9, 8, 8, 4), np.float32),
             view_params=np.zeros((9, 169), np.float32))
    assert cache_status(old, 9, 8, rec)[0] == "unrecorded"
    assert cache_status(tmp_path / "absent.npz", 9, 8, rec)[0] == "missing"
