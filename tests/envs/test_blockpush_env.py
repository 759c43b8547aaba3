"""The BlockPush env: layout, observation order, determinism, reward and info, rendering."""

from __future__ import annotations

import math

import numpy as np
import pybullet as pb
import pytest

from diffusion_policy.envs.blockpush_actions import absolute_actions
from diffusion_policy.envs.blockpush_env import (
    BLOCK_SIZE,
    BOTH_REWARD,
    FIRST_REWARD,
    INFO_KEYS,
    MIN_BLOCK_GAP,
    MIN_BLOCK_ZONE_GAP,
    MIN_ZONE_GAP,
    PAPER_BLOCK_DX,
    PAPER_BLOCK_X,
    PAPER_BLOCK_Y,
    PAPER_ZONE_X,
    PUSHER_FRICTION,
    PUSHER_RADIUS,
    WORKSPACE_X,
    WORKSPACE_Y,
    BlockPushEnv,
    make_blockpush_env,
    sample_layout,
)
from diffusion_policy.envs.blockpush_oracle import BlockPushOracle, Mode, run_oracle_episode


@pytest.fixture(scope="module")
def env():
    env = BlockPushEnv(render_size=64)
    yield env
    env.close()


def test_paper_layout_puts_blocks_near_and_zones_side_by_side_far():
    rng = np.random.default_rng(0)
    left_first = []
    for _ in range(200):
        layout = sample_layout(rng, "paper")
        blocks, zones = layout["blocks"], layout["zones"]
        assert np.all((blocks[:, 0] >= PAPER_BLOCK_X[0]) & (blocks[:, 0] <= PAPER_BLOCK_X[1]))
        assert np.all((blocks[:, 1] >= PAPER_BLOCK_Y[0]) & (blocks[:, 1] <= PAPER_BLOCK_Y[1]))
        assert abs(blocks[0, 0] - blocks[1, 0]) >= PAPER_BLOCK_DX
        assert np.abs(np.sort(zones[:, 0]) - PAPER_ZONE_X).max() <= 0.005
        assert np.abs(zones[:, 1] - 0.2).max() <= 0.0075 and np.abs(zones[:, 2]).max() <= 0.11
        left_first.append(zones[0, 0] < zones[1, 0])
    assert 0.35 < np.mean(left_first) < 0.65  # the zones' order is drawn


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="unknown BlockPush layout 'narrow'.*paper"):
        BlockPushEnv(layout="narrow")


def test_wide_layout_keeps_blocks_and_zones_apart():
    rng = np.random.default_rng(0)
    for _ in range(200):
        layout = sample_layout(rng, "wide")
        blocks, zones = layout["blocks"][:, :2], layout["zones"][:, :2]
        assert np.linalg.norm(blocks[0] - blocks[1]) >= MIN_BLOCK_GAP
        assert np.linalg.norm(zones[0] - zones[1]) >= MIN_ZONE_GAP
        assert np.linalg.norm(blocks[:, None] - zones[None], axis=-1).min() >= MIN_BLOCK_ZONE_GAP


def test_observation_is_the_papers_16_values_in_order(env):
    obs, info = env.reset(seed=3)
    assert obs.shape == (16,) and obs.dtype == np.float32
    assert env.observation_space.contains(obs)
    layout = env.layout
    np.testing.assert_allclose(obs[[0, 1, 3, 4]], layout["blocks"][:, :2].ravel(), atol=2e-3)
    np.testing.assert_allclose(obs[[6, 7]], obs[[8, 9]], atol=1e-3)  # effector at its target
    np.testing.assert_allclose(obs[10:16], layout["zones"].ravel(), atol=1e-6)
    assert set(info) == set(INFO_KEYS) and not info["is_success"]


def test_same_seed_same_observations_over_50_steps():
    actions = np.random.default_rng(7).uniform(-0.1, 0.1, (50, 2))
    runs = []
    for _ in range(2):
        env = BlockPushEnv()
        obs = [env.reset(seed=11)[0]] + [env.step(a)[0] for a in actions]
        runs.append(np.stack(obs))
        env.close()
    np.testing.assert_array_equal(runs[0], runs[1])
    env = BlockPushEnv()
    other = env.reset(seed=12)[0]
    env.close()
    assert not np.allclose(runs[0][0], other)


def test_target_moves_by_the_clipped_action_and_stays_in_the_workspace(env):
    start, _ = env.reset(seed=0)
    np.testing.assert_allclose(start[[8, 9]], [0.3, -0.4], atol=1e-6)  # the paper's start
    obs, *_ = env.step(np.array([0.5, -0.02]))  # x clipped to 0.1
    np.testing.assert_allclose(obs[[8, 9]], start[[8, 9]] + [0.1, -0.02], atol=1e-6)
    for _ in range(10):
        obs, *_ = env.step(np.array([-0.1, 0.1]))
    assert obs[8] == pytest.approx(WORKSPACE_X[0]) and obs[9] <= WORKSPACE_Y[1] + 1e-6
    with pytest.raises(ValueError, match=r"shape \(2,\), got \(3,\)"):
        env.step(np.zeros(3))


def test_info_holds_the_pushers_travel_over_the_step(env):
    obs, info = env.reset(seed=3)
    np.testing.assert_array_equal(info["effector_move"], [0.0, 0.0])
    for move in ([0.03, 0.0], [0.0, -0.02], [-0.01, 0.01]):
        last = obs[6:8].astype(np.float64)
        obs, _, _, _, info = env.step(np.array(move))
        np.testing.assert_allclose(info["effector_move"], obs[6:8] - last, atol=1e-6)
    assert np.linalg.norm(info["effector_move"]) > 0.005  # the pusher followed its target


def test_the_pusher_pushes_a_block_through_contact():
    env = BlockPushEnv(layout="wide")
    obs, _ = env.reset(seed=0)
    block = obs[:2].astype(np.float64)
    # Go 10 cm behind block 0 (smaller x), around nothing (start x is 0.2), then push along +x.
    behind = block - [0.08, 0.0]
    for _ in range(15):
        obs, _, _, _, info = env.step(np.clip(behind - obs[8:10], -0.03, 0.03))
    assert info["block_moved"] < 1e-3  # still behind it
    moved = []
    for _ in range(5):
        last = obs[:2].copy()
        obs, _, _, _, info = env.step(np.array([0.03, 0.0]))
        moved.append(info["block_moved"])
    assert moved[-1] == pytest.approx(np.linalg.norm(obs[:2] - last), abs=1e-4)
    assert obs[0] > block[0] + 0.05  # the block moved forward with the pusher
    assert abs(obs[1] - block[1]) < 0.03
    env.close()


def _straight_push(env: BlockPushEnv, friction: float, yaw: float, offset: float) -> float:
    """How far (m) block 0, turned by ``yaw`` and pushed ``offset`` metres beside its centre,
    travels in 12 steps of a straight 3 cm push along +y with the pusher's friction at
    ``friction``."""
    env.reset(seed=0)
    c = env._client
    pb.changeDynamics(env._pusher, -1, lateralFriction=friction, physicsClientId=c)
    quat = pb.getQuaternionFromEuler([0, 0, yaw])
    pb.resetBasePositionAndOrientation(env._blocks[0], [0.4, -0.25, 0.02], quat, physicsClientId=c)
    pb.resetBasePositionAndOrientation(env._blocks[1], [0.65, 0.45, 0.02], quat, physicsClientId=c)
    reach = BLOCK_SIZE / 2 * (abs(math.cos(yaw)) + abs(math.sin(yaw))) + PUSHER_RADIUS + 0.003
    start = np.array([0.4 + offset, -0.25 - reach])
    pusher = [*start, env._pusher_z]
    pb.resetBasePositionAndOrientation(env._pusher, pusher, [0, 0, 0, 1], physicsClientId=c)
    pb.changeConstraint(env._grip, jointChildPivot=pusher, physicsClientId=c)
    env._target = start
    y0 = env.block_poses()[0, 1]
    for _ in range(12):
        env.step(np.array([0.0, 0.03]))
    return env.block_poses()[0, 1] - y0


def test_the_pushers_friction_keeps_a_turned_block_in_front():
    # The paper's pusher friction: a block turned 20-30 degrees and pushed 5 mm off-centre goes
    # on with the pusher for most of the 36 cm, where a slippery pusher (0.2) loses it early.
    env = BlockPushEnv()
    for yaw in (math.radians(20), math.radians(30)):
        assert _straight_push(env, PUSHER_FRICTION, yaw, 0.005) > 0.2
        assert _straight_push(env, 0.2, yaw, 0.005) < 0.15
    env.close()


@pytest.mark.parametrize("mode", [Mode(0, 0), Mode(1, 1)])
def test_reward_and_info_along_an_oracle_episode(env, mode):
    obs, _ = env.reset(seed=5)
    oracle = BlockPushOracle(np.random.default_rng(0), mode=mode)
    rewards, infos = [], []
    for _ in range(350):
        obs, reward, terminated, truncated, info = env.step(oracle.act(obs))
        rewards.append(reward)
        infos.append(info)
        if terminated:
            break
    assert terminated and not truncated and infos[-1]["is_success"]
    assert rewards.count(FIRST_REWARD) == 1 and rewards[-1] == pytest.approx(BOTH_REWARD)
    first = rewards.index(FIRST_REWARD)
    assert all(i["first_block"] == -1 for i in infos[:first])
    assert {i["first_block"] for i in infos[first:]} == {mode.first_block}
    zone_of_b0 = mode.zone_of_block0
    assert (infos[-1]["block0_zone"], infos[-1]["block1_zone"]) == (zone_of_b0, 1 - zone_of_b0)


def test_render_is_an_rgb_frame():
    env = make_blockpush_env(render_size=48, max_episode_steps=3)
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (48, 48, 3) and frame.dtype == np.uint8 and frame.std() > 0
    for _ in range(3):
        *_, truncated, _ = env.step(np.zeros(2))
    assert truncated
    env.close()


def test_absolute_actions_replay_an_oracle_episode_exactly():
    env = BlockPushEnv()
    ep = run_oracle_episode(env, seed=3)
    targets = absolute_actions(ep.obs, ep.action)  # (T, 2)
    abs_env = BlockPushEnv(abs_action=True)
    obs, _ = abs_env.reset(seed=3)
    replayed = [obs]
    for target in targets[:-1]:
        obs, *_ = abs_env.step(target)
        replayed.append(obs)
    # float32 targets: sub-micron moves apart, which the contacts leave under 0.1 mm (and a few
    # milliradians of block yaw, the most contact-sensitive value)
    replayed = np.stack(replayed)
    yaws = [2, 5]
    np.testing.assert_allclose(np.delete(replayed, yaws, 1), np.delete(ep.obs, yaws, 1), atol=1e-4)
    np.testing.assert_allclose(replayed[:, yaws], ep.obs[:, yaws], atol=1e-2)
    np.testing.assert_allclose(targets[:-1], ep.obs[1:, 8:10], atol=1e-6)
    env.close()
    abs_env.close()
