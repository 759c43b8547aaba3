"""Every experiment composes and instantiates; overrides behave as documented."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from diffusion_policy.training.builders import build_policy
from diffusion_policy.training.optim import build_optimizer

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
# Push-T's experiments; other tasks test theirs beside their env.
EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("pusht*.yaml"))


def _compose(overrides: list[str], name: str = "train"):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment, tiny_pusht_all_zarr, tmp_path):
    cfg = _compose([f"+experiment={experiment}", f"dataset.zarr_path={tiny_pusht_all_zarr}"])
    assert cfg.name == experiment
    dataset = instantiate(cfg.dataset)
    policy = build_policy(cfg, dataset.shape_meta)
    assert policy.horizon == cfg.horizon
    assert sum(p.numel() for p in policy.parameters()) > 0
    runner = instantiate(cfg.env_runner, output_dir=str(tmp_path))
    assert [s for split, s in runner.seeds if split == "test"] == list(range(100000, 100050))
    assert runner.max_steps == 300
    assert build_optimizer(cfg.optimizer, policy).param_groups


def test_paper_keypoint_settings():
    cfg = _compose(["+experiment=pusht_lowdim"])
    assert list(cfg.denoiser.down_dims) == [256, 512, 1024]
    assert cfg.trainer.batch_size == 256
    assert cfg.dataset.max_train_episodes == 90
    assert cfg.noise_scheduler.num_train_timesteps == 100
    assert cfg.noise_scheduler.beta_schedule == "squaredcos_cap_v2"
    assert cfg.optimizer.lr == 1e-4 and list(cfg.optimizer.betas) == [0.95, 0.999]
    assert cfg.lr_scheduler.num_warmup_steps == 500
    assert (cfg.horizon, cfg.n_obs_steps, cfg.n_action_steps) == (16, 2, 8)


def test_command_line_beats_experiment_and_debug():
    cfg = _compose(["+experiment=pusht_lowdim", "+debug=fast", "trainer.batch_size=7"])
    assert cfg.trainer.batch_size == 7
    assert list(cfg.denoiser.down_dims) == [16, 32]  # debug beats the experiment


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigCompositionException, match="trainer.bogus"):
        _compose(["+experiment=pusht_lowdim", "trainer.bogus=1"])


def test_eval_config_composes_with_scheduler_override():
    cfg = _compose(["checkpoint=x.ckpt", "noise_scheduler=ddpm"], name="eval")
    assert cfg.noise_scheduler._target_ == "diffusers.DDPMScheduler"
    assert "noise_scheduler" not in _compose(["checkpoint=x.ckpt"], name="eval")


def test_eval_config_moves_the_test_seeds():
    cfg = _compose(["checkpoint=x.ckpt", "runner.test_start_seed=100200"], name="eval")
    assert cfg.runner.test_start_seed == 100200
    assert _compose(["checkpoint=x.ckpt"], name="eval").runner.test_start_seed is None


def test_trainer_schema_matches_the_trainer_config():
    """configs/trainer/default.yaml sets a value for every key of its schema, and no other key."""
    import dataclasses

    from omegaconf import OmegaConf

    from diffusion_policy.training.config_checks import TrainerSchema

    yaml_keys = set(OmegaConf.load(Path(CONFIG_DIR) / "trainer" / "default.yaml")) - {"defaults"}
    assert yaml_keys == {f.name for f in dataclasses.fields(TrainerSchema)}
    trainer = _compose([]).trainer
    assert OmegaConf.get_type(trainer) is TrainerSchema
    assert not OmegaConf.missing_keys(trainer)  # the YAML gives every field its value


def test_trainer_value_of_wrong_type_fails_at_compose():
    with pytest.raises(ConfigCompositionException, match="trainer.batch_size=many"):
        _compose(["+experiment=pusht_lowdim", "trainer.batch_size=many"])
