"""The trainer's parts, each built and checked without a whole trainer."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from diffusion_policy.training.checkpoint import nonfinite_tensors
from diffusion_policy.training.config_checks import ConfigError, check_config, check_windows
from diffusion_policy.training.resume import apply_optimizer_settings
from diffusion_policy.training.setup import per_rank_batch_size


def test_per_rank_batch_size():
    assert per_rank_batch_size(256, 4) == 64
    with pytest.raises(ConfigError, match=r"trainer.batch_size=10 .* WORLD_SIZE=3"):
        per_rank_batch_size(10, 3)


def test_window_sizes_are_checked_once_with_all_three_values():
    check_windows(16, 2, 8)
    with pytest.raises(ConfigError, match=r"horizon=8 is too short for n_obs_steps=2 and n_act"):
        check_windows(8, 2, 8)
    cfg = OmegaConf.create({"seed": 0, "horizon": 4, "n_obs_steps": 2, "n_action_steps": 8})
    with pytest.raises(ConfigError, match="horizon=4"):
        check_config(cfg)


def test_nonfinite_tensors_names_them():
    state = {"model": {"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])}, "n": 3}
    assert nonfinite_tensors(state) == ["model.b"]
    assert nonfinite_tensors({"i": torch.tensor([1, 2])}) == []


def test_changed_lr_keeps_its_place_in_the_schedule():
    param = torch.nn.Parameter(torch.zeros(1))
    old = torch.optim.AdamW([param], lr=1e-4, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(old, lambda step: 0.5)
    new = torch.optim.AdamW([param], lr=1e-3, weight_decay=0.2)
    new_schedule = torch.optim.lr_scheduler.LambdaLR(new, lambda step: 0.5)
    settings = [{k: v for k, v in g.items() if k != "params"} for g in new.param_groups]
    new.load_state_dict(old.state_dict())
    new_schedule.load_state_dict(schedule.state_dict())
    apply_optimizer_settings(new, settings, new_schedule)
    group = new.param_groups[0]
    assert (group["lr"], group["initial_lr"], group["weight_decay"]) == (5e-4, 1e-3, 0.2)
    assert new_schedule.get_last_lr() == [5e-4]
