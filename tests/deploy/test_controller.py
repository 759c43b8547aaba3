"""The controller's history, queue, early planning, ensembling, seeding and coherence, by hand."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from diffusion_policy.deploy.controller import BatchController, Controller
from tests.deploy.fakes import EchoPolicy


def _run(controller: Controller, ticks: range) -> list[float]:
    return [float(controller.act(np.array([t], dtype=np.float32))[0]) for t in ticks]


def test_history_repeats_the_first_observation_and_plans_when_the_queue_runs_out():
    policy = EchoPolicy(n_obs_steps=3, n_action_steps=2, chunk=5)
    controller = Controller(policy)
    controller.reset()
    actions = _run(controller, range(10, 16))
    # Ticks 10, 12, 14 plan; each chunk's first 2 actions are executed.
    assert policy.calls == [[[10, 10, 10]], [[10, 11, 12]], [[12, 13, 14]]]
    assert actions == [10, 11, 12, 13, 14, 15]


def test_reset_forgets_history_and_queue():
    policy = EchoPolicy(n_obs_steps=2, n_action_steps=4)
    controller = Controller(policy)
    controller.reset()
    _run(controller, range(0, 2))  # plans at 0; two actions of its chunk left
    controller.reset()
    assert _run(controller, [50]) == [50]  # plans again, from the new first observation
    assert policy.calls == [[[0, 0]], [[50, 50]]]


def test_dict_observations_keep_uint8_and_cast_the_rest_to_float32():
    seen = {}

    class Spy:
        def predict_action(self, obs):
            seen.update({k: (v.dtype, tuple(v.shape)) for k, v in obs.items()})
            return {"action": torch.zeros(2, 3, 2)}

    controller = BatchController(Spy(), n_obs_steps=2, n_action_steps=3)
    obs = {"image": np.zeros((2, 4, 4, 3), np.uint8), "agent_pos": np.zeros((2, 2), np.float64)}
    assert controller.act(obs).shape == (2, 2)
    assert seen["image"] == (torch.uint8, (2, 2, 4, 4, 3))
    assert seen["agent_pos"] == (torch.float32, (2, 2, 2))


def test_replan_early_without_thread_uses_the_new_chunk_at_once():
    policy = EchoPolicy(n_obs_steps=2, n_action_steps=4)
    controller = Controller(policy, replan_at=1)
    controller.reset()
    assert _run(controller, range(8)) == list(range(8))
    # Plans at 0, then when 1 action remains: tick 3 (chunk 0..3), tick 6 (chunk 3..6).
    assert [call[0][-1] for call in policy.calls] == [0, 3, 6]


def test_ensembling_weights_overlapping_chunks_oldest_first():
    class Constant:
        """Chunk j is all j: the ensemble's weights are visible in the actions."""

        n_obs_steps, n_action_steps = 1, 3

        def __init__(self):
            self.j = 0

        def predict_action(self, obs):
            self.j += 1
            return {"action": torch.full((1, 3, 1), float(self.j - 1))}

    m = 0.5
    controller = Controller(Constant(), replan_at=2, ensemble_decay=m)  # plans every tick
    controller.reset()
    actions = [float(controller.act(np.zeros(1))[0]) for _ in range(4)]
    w = np.exp(-m * np.arange(3))
    assert actions[0] == 0.0  # one chunk
    assert actions[1] == pytest.approx((w[0] * 0 + w[1] * 1) / w[:2].sum())
    assert actions[2] == pytest.approx((w[0] * 0 + w[1] * 1 + w[2] * 2) / w.sum())
    assert actions[3] == pytest.approx((w[0] * 1 + w[1] * 2 + w[2] * 3) / w.sum())


def test_background_planning_at_10hz_never_waits_after_the_first_tick():
    policy = EchoPolicy(n_obs_steps=2, n_action_steps=8, chunk=16, delay_s=0.05)
    period = 0.1
    with Controller(policy, replan_at=2, background=True) as controller:
        controller.reset()
        waits, actions = [], []
        deadline = time.perf_counter()
        for t in range(24):
            actions.append(float(controller.act(np.array([t], np.float32))[0]))
            waits.append(controller.last_wait_s)
            deadline += period
            time.sleep(max(0.0, deadline - time.perf_counter()))
    assert waits[0] >= 0.05  # the first chunk is planned while the robot waits
    assert max(waits[1:]) < 0.03, waits  # far below the 50 ms a blocked tick would wait
    assert actions == list(range(24))  # chunks aligned in time: their stale actions dropped
    assert len(policy.calls) > 24 // 8  # it planned ahead, more often than every 8 ticks


def test_seed_gives_a_fresh_generator_per_chunk_reproducibly():
    draws = []
    for _ in range(2):
        policy = EchoPolicy(n_obs_steps=1, n_action_steps=2)
        controller = Controller(policy, seed=7)
        controller.reset()
        _run(controller, range(4))
        draws.append([torch.rand(1, generator=g).item() for g in policy.generators])
    assert draws[0] == draws[1] and len(set(draws[0])) == 2
    policy = EchoPolicy(n_obs_steps=1, n_action_steps=2)
    controller = Controller(policy)
    controller.reset()
    _run(controller, range(2))
    assert policy.generators == [None]  # unseeded: the policy's own generator


class TwoWays:
    """Plans to walk one unit per tick from the observed position, forward or back at random.

    Action ``i`` of a plan made at position ``x`` is ``x + sign * (i + 1)`` (the position after
    tick ``i``); ``action_pred`` is the whole plan, its first action at the planning tick.
    """

    n_obs_steps, n_action_steps, horizon = 1, 1, 4

    def predict_action(self, obs, generator=None):
        x = obs["obs"][:, -1:, :]  # (B, 1, 1) the position now
        sign = torch.randint(0, 2, x.shape, generator=generator) * 2 - 1  # (B, 1, 1)
        plan = x + sign * torch.arange(1, self.horizon + 1).view(1, -1, 1)  # (B, H, 1)
        return {"action": plan[:, :1], "action_pred": plan}


def _walk(controller: BatchController, ticks: int = 20) -> np.ndarray:
    """Positions of 3 walkers over the ticks, each action being the next position."""
    position = np.zeros((3, 1), dtype=np.float32)
    path = []
    for _ in range(ticks):
        position = controller.act(position)  # (3, 1)
        path.append(position[:, 0])
    return np.stack(path, axis=1)  # (3, ticks)


def test_coherence_keeps_each_robot_on_the_way_its_first_plan_took():
    steps = np.diff(_walk(BatchController(TwoWays(), seed=0)), axis=1)  # (3, 19) of +-1
    assert (steps[:, 1:] != steps[:, :-1]).any()  # fresh samples change ways
    coherent = BatchController(TwoWays(), seed=0, coherence_samples=8)
    steps = np.diff(_walk(coherent), axis=1)
    assert (np.abs(steps) == 1).all()
    assert (steps == steps[:, :1]).all()  # each robot's first way, to the end
    coherent.reset()  # a new episode owes nothing to the last one's plans
    assert coherent._previous is None


def test_coherence_needs_the_whole_prediction():
    with pytest.raises(KeyError, match="'action_pred' entry"):
        Controller(EchoPolicy(n_obs_steps=1, n_action_steps=2), coherence_samples=2).act(
            np.zeros(1)
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"coherence_samples": 0}, "coherence_samples=0 must be an integer >= 1"),
        ({"replan_at": 4}, "replan_at=4 must be in"),
        ({"replan_at": 0, "background": True}, "background planning with replan_at=0"),
        ({"ensemble_decay": 0.1}, "ensemble_decay=0.1"),
        ({"seed": -1}, "seed=-1"),
    ],
)
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Controller(EchoPolicy(n_action_steps=4), **kwargs)


def test_malformed_policy_output_is_named():
    class NoAction:
        def predict_action(self, obs):
            return {"act": torch.zeros(1, 2, 1)}

    class WrongShape:
        def predict_action(self, obs):
            return {"action": torch.zeros(1, 2)}

    with pytest.raises(KeyError, match="'action' entry"):
        Controller(NoAction(), n_obs_steps=1, n_action_steps=1).act(np.zeros(1))
    with pytest.raises(ValueError, match=r"shape \(1, 2\), expected \(1, Ta, Da\)"):
        Controller(WrongShape(), n_obs_steps=1, n_action_steps=1).act(np.zeros(1))
    short = EchoPolicy(n_obs_steps=1, n_action_steps=2, chunk=2)  # returns 2 actions a plan
    with pytest.raises(ValueError, match="chunks of 2 actions, fewer than n_action_steps=3"):
        Controller(short, n_action_steps=3).act(np.zeros(1))
