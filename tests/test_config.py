"""Hydra configuration: every group composes, package directives place each network, derived
sizes come out of the built networks, experiments override what they should."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
GROUPS = {
    "datamodule": ["faceverse", "synthetic"],
    "logger": ["wandb", "csv"],
}
# configs/deformer/<name>.yaml -> its class
DEFORMERS = {"exact": "lib.model.deformer.ForwardDeformer",
             "fast": "lib.model.fast_deformer.FastForwardDeformer"}
EXPERIMENTS = sorted(p.stem for p in (Path(CONFIGS) / "experiments").glob("*.yaml"))


def _compose(overrides=()):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _select(cfg, block: str):
    """The sub-config at a dotted path ('test.fit.flame')."""
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, block)


def test_default_config_matches_the_original_defaults():
    cfg = _compose()
    m = cfg.model
    assert (m.dim_shape, m.dim_detail, m.dim_color) == (256, 128, 64)
    assert m.deformer.max_steps == 50 and m.optim.lr == 1e-3 and m.nepochs_pretrain == 1
    assert (m.lambda_bone_occ, m.lambda_bone_w, m.lambda_disp) == (1, 10, 10)
    assert (m.lambda_reg, m.lambda_reg_color, m.d_reg_every) == (1e-3, 1e-3, 16)
    assert cfg.trainer.max_epochs == 300 and m.gradient_clip_val == 0.1
    assert cfg.datamodule.points_per_frame == 2000 and cfg.datamodule.batch_size == 32
    assert cfg.datamodule.repeat == 10 and cfg.datamodule.n_views == 9
    # package directives put each network config in its own place
    assert m.occ_network._target_.endswith("build_geometry_network")
    assert m.deformer.lbs_network._target_.endswith("LBSNetwork")
    assert m.deformer.disp_network._target_.endswith("build_displacement_network")
    assert m.norm_network._target_.endswith("build_normal_network")
    assert m.tex_network._target_.endswith("build_texture_network")
    assert cfg.output_dir == "outputs/coarse"


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option):
    cfg = _compose([f"{group}={option}"])
    assert cfg[group]._target_


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("deformer", [None, *DEFORMERS])
def test_every_experiment_composes(experiment, deformer):
    extra = [] if deformer is None else [f"deformer={deformer}"]
    cfg = _compose([f"+experiments={experiment}", "datamodule=synthetic", *extra])
    assert cfg.datamodule.processed_dir == "data/synthetic/processed"
    # the command line's deformer wins over the experiment's; the cpu experiments pick fast
    expected = deformer or ("fast" if "cpu" in experiment else "exact")
    assert cfg.model.deformer._target_ == DEFORMERS[expected]
    assert cfg.model.deformer.lbs_network._target_.endswith("LBSNetwork")


@pytest.mark.parametrize("name", sorted(DEFORMERS))
def test_deformer_group_file_lists_every_constructor_argument(name):
    """configs/deformer/<name>.yaml: its class and every argument the model does not derive,
    each equal to the constructor's default (the files add no silent change)."""
    import importlib
    import inspect

    from omegaconf import OmegaConf

    entry = OmegaConf.to_container(_compose([f"deformer={name}"]).model.deformer, resolve=True)
    assert entry.pop("_target_") == DEFORMERS[name]
    for net in ("lbs_network", "disp_network"):  # placed beside it by the network group
        entry.pop(net)
    module, cls = DEFORMERS[name].rsplit(".", 1)
    params = inspect.signature(getattr(importlib.import_module(module), cls)).parameters
    derived = {"lbs_net", "n_joints", "bbox_min", "bbox_max"}
    assert set(entry) == set(params) - derived
    for key, value in entry.items():
        default = params[key].default
        assert value == (list(default) if isinstance(default, tuple) else default), key


def test_default_deformer_is_the_originals():
    assert sorted(p.stem for p in (Path(CONFIGS) / "deformer").glob("*.yaml")) == sorted(DEFORMERS)
    assert _compose().model.deformer._target_ == DEFORMERS["exact"]


def test_cpu_experiment_shrinks_the_run_and_uses_csv_logs():
    cfg = _compose(["+experiments=cpu"])
    assert cfg.trainer.accelerator == "cpu"
    assert cfg.datamodule.batch_size < 32 and cfg.datamodule.points_per_frame < 2000
    assert cfg.logger._target_.endswith("CSVLogger")


def test_network_widths_are_derived_not_typed():
    cfg = _compose()
    occ = instantiate(cfg.model.occ_network, feature_dim=64)
    norm = instantiate(cfg.model.norm_network, detail_dim=cfg.model.dim_detail,
                       geometry_feature_dim=occ.feature_dim)
    tex = instantiate(cfg.model.tex_network, color_dim=cfg.model.dim_color,
                      pose_exp_dim=15 + cfg.model.n_exp, geometry_feature_dim=occ.feature_dim,
                      normal_feature_dim=norm.feature_dim)
    # docs/design.md, Networks: 229 = 256 - 27 (skip), normal cond 128 + 229, texture 129 + 485
    assert occ.feature_dim == 229
    assert norm.cond_dim == 128 + 229
    assert tex.cond_dim == 64 + 65 + 229 + 256


# ---------------------------------------------------------------- test.py's typed options
def _runner_options():
    from lib.inference.control import ControlOptions
    from lib.inference.fitting import CropOptions, FitOptions, FlameFitOptions, StartOptions
    from lib.inference.reenact import ReenactOptions
    from lib.inference.sampling import SampleOptions

    return {"test.sample": SampleOptions, "test.control": ControlOptions,
            "test.reenact": ReenactOptions, "test.fit": FitOptions,
            "test.fit.flame": FlameFitOptions, "test.fit.crop": CropOptions,
            "test.fit.init": StartOptions}


@pytest.mark.parametrize("block", ["test.sample", "test.control", "test.reenact", "test.fit",
                                   "test.fit.flame", "test.fit.crop", "test.fit.init"])
def test_every_option_block_key_is_a_field_and_back(block):
    cls = _runner_options()[block]
    section = _select(_compose(), block)
    assert set(section) == set(cls.field_names()), block
    assert cls.BLOCK == block
    # the dataclass defaults are the config's
    assert cls.from_config(section) == cls()


def test_test_block_holds_only_shared_settings_and_runner_blocks():
    cfg = _compose()
    runners = {b.split(".")[1] for b in _runner_options() if b.count(".") == 1}
    shared = set(cfg.test) - runners
    assert shared == {"device", "res", "mesh_res", "grid_cols", "n_frames", "save_meshes"}
    # every shared setting reaches every runner block that has the field, and only there
    cfg = _compose(["test.res=72", "test.mesh_res=40", "test.grid_cols=5", "test.n_frames=7",
                    "test.save_meshes=true", "test.fit.res=64"])
    for block, cls in _runner_options().items():
        opts = cls.from_config(_select(cfg, block), block)
        for key, value in (("res", 64 if block == "test.fit" else 72), ("mesh_res", 40),
                           ("grid_cols", 5), ("n_frames", 7), ("save_meshes", True)):
            if key in cls.field_names():
                assert getattr(opts, key) == value, (block, key)


def test_flame_fit_options_are_fit_flame_arguments():
    import inspect

    from lib.inference.fitting import FlameFitOptions
    from lib.inference.flame_fit import fit_flame

    params = inspect.signature(fit_flame).parameters
    for name in FlameFitOptions.field_names():
        assert name in params
        assert FlameFitOptions().__getattribute__(name) == (
            tuple(params[name].default) if name == "orientations" else params[name].default)


@pytest.mark.parametrize("override,where", [("+test.sample.n_sample=8", "test.sample.n_sample"),
                                            ("+test.control.steps=3", "test.control.steps"),
                                            ("+test.reenact.fps=30", "test.reenact.fps"),
                                            ("+test.fit.flame.steps=3", "test.fit.flame.steps")])
def test_unknown_option_is_refused_by_name(override, where):
    from lib.inference.loading import InferenceError

    block = where.rsplit(".", 1)[0]
    cfg = _compose([override])
    top = block if block != "test.fit.flame" else "test.fit"
    with pytest.raises(InferenceError, match=rf"{where} is not an option of {block} \("):
        _runner_options()[top].from_config(_select(cfg, top))


def test_option_types_are_checked():
    from lib.inference.control import ControlOptions
    from lib.inference.fitting import FitOptions
    from lib.inference.loading import InferenceError
    from lib.inference.reenact import ReenactOptions
    from lib.inference.sampling import SampleOptions

    with pytest.raises(InferenceError, match=r"test.sample.n_samples must be int, got 'many'"):
        SampleOptions.from_config({"n_samples": "many"})
    with pytest.raises(InferenceError, match=r"test.control.save_meshes must be bool, got 1"):
        ControlOptions.from_config({"save_meshes": 1})
    with pytest.raises(InferenceError, match=r"test.control.component must be int, got True"):
        ControlOptions.from_config({"component": True})
    with pytest.raises(InferenceError, match=r"test.fit.flame.orientations\[1\] must be str"):
        FitOptions.from_config({"flame": {"orientations": ["identity", 3]}})
    with pytest.raises(InferenceError, match=r"test.fit.flame must be FlameFitOptions"):
        FitOptions.from_config({"flame": 3})
    # an int where a float belongs becomes that float; a list where a tuple belongs a tuple;
    # None is allowed where the type says so
    fit = FitOptions.from_config({"shape_lr": 1, "flame": {"orientations": ["flip_yz"]}})
    assert fit.shape_lr == 1.0 and isinstance(fit.shape_lr, float)
    assert fit.flame.orientations == ("flip_yz",) and fit.flame.n_points == 2000
    assert ReenactOptions.from_config({"max_frames": None}).max_frames is None
    assert ReenactOptions.from_config({"max_frames": 5}).max_frames == 5
    with pytest.raises(
        InferenceError, match=r"test.reenact.max_frames must be int or None, got 2.5"
    ):
        ReenactOptions.from_config({"max_frames": 2.5})
    with pytest.raises(Exception, match="cannot assign"):  # frozen
        fit.shape_lr = 2.0


def test_test_py_refuses_an_unknown_option_before_loading_a_checkpoint(tmp_path):
    """test.py stops at the misspelt key (the checkpoint it names does not even exist)."""
    import importlib.util

    from lib.inference.loading import InferenceError

    spec = importlib.util.spec_from_file_location("ganhead_test_entry",
                                                  Path(CONFIGS).parent / "test.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    cfg = _compose(["eval_mode=fit", "+test.fit.shape_step=3", f"ckpt={tmp_path / 'none.ckpt'}"])
    with pytest.raises(InferenceError, match=r"test.fit.shape_step is not an option of test.fit"):
        entry.run(cfg)
