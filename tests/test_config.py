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
EXPERIMENTS = sorted(p.stem for p in (Path(CONFIGS) / "experiments").glob("*.yaml"))


def _compose(overrides=()):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


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
def test_every_experiment_composes(experiment):
    cfg = _compose([f"+experiments={experiment}", "datamodule=synthetic"])
    assert cfg.datamodule.processed_dir == "data/synthetic/processed"


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
