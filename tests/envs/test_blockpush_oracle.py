"""The scripted BlockPush oracle: it succeeds, in the mode it drew, deterministically."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffusion_policy.envs.blockpush_env import BLOCK_XY, BLOCK_YAW, ZONE_XY, BlockPushEnv
from diffusion_policy.envs.blockpush_oracle import (
    NEAR_ZONE,
    ORIENT_START,
    BlockPushOracle,
    face_error,
    run_oracle_episode,
)


@pytest.fixture(scope="module")
def env():
    env = BlockPushEnv()
    yield env
    env.close()


def _success_rate(env: BlockPushEnv, seeds: range) -> float:
    return float(np.mean([run_oracle_episode(env, s).success for s in seeds]))


@pytest.mark.parametrize("layout", ["paper", "wide"])
def test_oracle_succeeds_on_10_seeds(layout):
    env = BlockPushEnv(layout=layout)
    assert _success_rate(env, range(1000, 1010)) == 1.0
    env.close()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["paper", "wide"])
def test_oracle_p2_on_200_seeds_is_at_least_95_percent(layout):
    env = BlockPushEnv(layout=layout)
    assert _success_rate(env, range(200)) >= 0.95
    env.close()


def test_oracle_episode_is_deterministic_and_draws_every_mode(env):
    a, b = run_oracle_episode(env, 4), run_oracle_episode(env, 4)
    np.testing.assert_array_equal(a.obs, b.obs)
    np.testing.assert_array_equal(a.action, b.action)
    assert a.mode == b.mode
    assert a.obs.shape == (len(a.action), 16) and a.action.shape[1] == 2
    modes = {BlockPushOracle(np.random.default_rng([s, 1])).mode for s in range(40)}
    assert len(modes) == 4


def test_exec_noise_perturbs_the_executed_moves_not_the_recorded_ones(env):
    # Without noise the recorded move is what the effector target did; with it, the target
    # strays from the recorded (the oracle's own) moves, and the episode still succeeds.
    target = slice(8, 10)
    clean = run_oracle_episode(env, 1000)
    np.testing.assert_allclose(np.diff(clean.obs[:, target], axis=0), clean.action[:-1], atol=1e-5)
    noisy = run_oracle_episode(env, 1000, exec_noise=0.01)
    strays = np.abs(np.diff(noisy.obs[:, target], axis=0) - noisy.action[:-1]).max(axis=1)
    assert noisy.success and np.median(strays) > 0.003


def test_detours_take_the_effector_far_off_and_the_oracle_brings_it_back(env):
    # A detour's executed moves differ from the recorded ones by centimetres for a few steps
    # at a time; the oracle's moves recorded there lead back, and the episode succeeds.
    target = slice(8, 10)
    ep = run_oracle_episode(env, 1001, detour_prob=0.05)
    strays = np.linalg.norm(np.diff(ep.obs[:, target], axis=0) - ep.action[:-1], axis=1)
    assert ep.success and (strays > 0.02).sum() >= 5
    assert (strays <= 1e-5).mean() > 0.5  # between detours the oracle's moves are executed


def test_drifts_offset_pushes_sideways_by_a_constant_and_the_oracle_recovers(env):
    # A drift adds the same sideways offset (5-15 mm) to a few consecutive executed moves, only
    # while pushing; the recorded moves stay the oracle's, and the episode still succeeds.
    target = slice(8, 10)
    ep = run_oracle_episode(env, 1002, drift_prob=0.2)
    strays = np.diff(ep.obs[:, target], axis=0) - ep.action[:-1]  # (T-1, 2) executed - recorded
    size = np.linalg.norm(strays, axis=1)
    drifting = size > 1e-4
    assert ep.success and drifting.sum() >= 6
    assert np.all((size[drifting] > 0.0049) & (size[drifting] < 0.0151))
    same_as_next = np.linalg.norm(strays[1:] - strays[:-1], axis=1) < 1e-4
    assert same_as_next[drifting[1:] & drifting[:-1]].mean() > 0.8  # one offset per drift
    across = np.abs(np.sum(strays * ep.action[:-1], axis=1)) / (
        size * np.linalg.norm(ep.action[:-1], axis=1) + 1e-9
    )
    assert np.median(across[drifting]) < 0.5  # mostly across the move, not along it


def test_face_error_is_the_angle_to_the_nearest_face_normal():
    east, north = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    assert face_error(0.0, east) == pytest.approx(0.0)
    assert face_error(0.0, north) == pytest.approx(0.0)  # another face
    assert face_error(0.3, east) == pytest.approx(-0.3)
    assert face_error(0.8, east) == pytest.approx(math.pi / 2 - 0.8)  # past 45 degrees
    assert face_error(-math.pi, -east) == pytest.approx(0.0)


def test_oracle_turns_blocks_and_pushes_them_face_on(env):
    # Every push is issued with a face of the block within ORIENT_START of square to the
    # block->zone line (unless the block is nearly in), and blocks were turned to get there.
    errors, phases = [], set()
    for seed in range(5):
        obs, _ = env.reset(seed=seed)
        oracle = BlockPushOracle(np.random.default_rng([seed, 1]))
        for _ in range(350):
            action = oracle.act(obs)
            phases.add(oracle.phase)
            block = oracle.block
            if oracle.phase == "push" and block is not None:
                zone = obs[list(ZONE_XY[oracle.mode.zone_of(block)])]
                to_zone = zone - obs[list(BLOCK_XY[block])]
                if np.linalg.norm(to_zone) > NEAR_ZONE:
                    errors.append(abs(face_error(obs[BLOCK_YAW[block]], to_zone)))
            obs, _, terminated, _, info = env.step(action)
            if terminated:
                break
        assert info["is_success"]
    assert "orient" in phases
    assert max(errors) <= ORIENT_START
    assert np.median(errors) < ORIENT_START / 2
