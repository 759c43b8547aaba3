"""Training to a time budget: the clock, the fitted learning-rate schedule, the trainer."""

from pathlib import Path

import pytest
import torch

from diffusion_policy.training import time_budget
from diffusion_policy.training.checkpoint import load_checkpoint
from diffusion_policy.training.config_checks import check_config
from diffusion_policy.training.time_budget import TimeBudget, budget_lr_schedule
from diffusion_policy.training.trainer import Trainer
from diffusion_policy.utils.jsonl import read_jsonl
from tests.helpers import debug_cfg

REPO = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(time_budget.time, "monotonic", fake)
    return fake


def test_budget_counts_training_time_and_leaves_out_paused_time(clock):
    budget = TimeBudget(minutes=1)
    budget.start()
    clock.now = 30.0
    assert budget.progress == pytest.approx(0.5) and not budget.exhausted
    with budget.paused():  # a rollout
        clock.now = 1000.0
    assert budget.spent == pytest.approx(30.0)
    clock.now = 1029.0
    assert not budget.exhausted
    clock.now = 1030.0
    assert budget.exhausted and budget.progress == 1.0


def test_budget_state_survives_a_resume(clock):
    budget = TimeBudget(minutes=1)
    budget.start()
    clock.now = 45.0
    state = budget.state_dict()
    resumed = TimeBudget(minutes=1)
    resumed.load_state_dict(state)
    resumed.start()
    clock.now = 50.0
    assert resumed.spent == pytest.approx(50.0)


def test_unlimited_budget_counts_time_but_never_ends(clock):
    budget = TimeBudget(minutes=None)
    budget.start()
    clock.now = 1e9
    assert not budget.limited and not budget.exhausted and budget.progress == 0.0
    assert budget.spent == pytest.approx(1e9)


@pytest.mark.parametrize("minutes", [0, -1])
def test_budget_rejects_nonpositive_minutes(minutes):
    with pytest.raises(ValueError, match="must be > 0"):
        TimeBudget(minutes)


@pytest.mark.parametrize("value", [0, -2.5, "ten", True])
def test_config_check_names_bad_max_minutes(value):
    with pytest.raises(ValueError, match=r"trainer\.max_minutes"):
        check_config(
            {
                "seed": 0,
                "horizon": 16,
                "n_obs_steps": 2,
                "n_action_steps": 8,
                "trainer": {
                    "num_epochs": 1,
                    "batch_size": 2,
                    "num_workers": 0,
                    "log_every": 1,
                    "topk": 1,
                    "max_nonfinite_steps": 1,
                    "max_minutes": value,
                },
            }
        )


def test_lr_warms_up_by_steps_then_decays_over_the_budget(clock):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    budget = TimeBudget(minutes=10)
    budget.start()
    schedule = budget_lr_schedule(optimizer, budget, name="cosine", num_warmup_steps=4)
    lrs = []
    for _ in range(4):  # warm-up: the clock has not moved
        optimizer.step()
        schedule.step()
        lrs.append(schedule.get_last_lr()[0])
    assert lrs == pytest.approx([0.5, 0.75, 1.0, 1.0])
    clock.now = 300.0  # half the budget
    optimizer.step()
    schedule.step()
    assert schedule.get_last_lr()[0] == pytest.approx(0.5)
    clock.now = 600.0
    optimizer.step()
    schedule.step()
    assert schedule.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_lr_schedule_names_an_unsupported_schedule():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="polynomial"):
        budget_lr_schedule(optimizer, TimeBudget(1), name="polynomial")


def test_trainer_stops_on_time_with_the_schedule_finished(pusht_zarr_path, tmp_path, monkeypatch):
    # A clock that moves 1 s at every reading: the run's length does not depend on the machine.
    ticks = iter(range(10**9))
    monkeypatch.setattr(time_budget.time, "monotonic", lambda: float(next(ticks)))
    cfg = debug_cfg(
        pusht_zarr_path,
        "trainer.max_minutes=1",  # 60 clock readings
        "trainer.num_epochs=100000",
        "trainer.rollout_every=0",
        "trainer.checkpoint_every=1000",
    )
    run = tmp_path / "run"
    metrics = Trainer(cfg, run).train()
    records = read_jsonl(run / "logs.jsonl")
    steps = [r for r in records if "lr" in r]
    assert len(steps) > 5  # it trained for the budget, not for num_epochs
    assert metrics["epoch"] < 100000 - 1
    assert 1 <= metrics["train/minutes"] < 1.2  # ends after the step that ran out
    assert steps[-1]["lr"] < 0.02 * cfg.optimizer.lr  # the cosine reached its end on time
    # The last epoch was cut short and still checkpointed, with the spent time.
    state = load_checkpoint(run / "checkpoints" / "latest.ckpt")
    assert state["global_step"] == steps[-1]["step"]
    assert state["clock"]["spent"] == pytest.approx(metrics["train/minutes"] * 60, abs=3)
