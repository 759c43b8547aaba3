"""PushTEnv: observations, the paper's seeded reset, recorded-state resets and replays."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gym_pusht.envs.pusht import PushTEnv as GymPushTEnv

from diffusion_policy.envs.pusht_env import PushTEnv, make_pusht_env, protocol_initial_state


def test_keypoint_observation_spaces_and_dtypes():
    env = PushTEnv(obs_type="keypoint")
    obs, info = env.reset(seed=3)
    assert set(obs) == {"keypoint", "agent_pos"}
    assert obs["keypoint"].shape == (18,) and obs["keypoint"].dtype == np.float32
    assert obs["agent_pos"].shape == (2,) and obs["agent_pos"].dtype == np.float32
    assert env.observation_space.contains(obs)
    assert 0.0 <= info["coverage"] <= 1.0 and info["is_success"] is False
    obs, reward, terminated, truncated, info = env.step(obs["agent_pos"] + 10)
    assert env.observation_space.contains(obs)
    assert isinstance(reward, float) and isinstance(terminated, bool) and truncated is False
    assert reward == pytest.approx(min(info["coverage"] / 0.95, 1.0))
    assert info["is_success"] == (info["coverage"] > 0.95) == terminated


def test_image_observation_and_render_size():
    env = PushTEnv(obs_type="image", render_size=64)
    obs, _ = env.reset(seed=0)
    assert obs["image"].shape == (96, 96, 3) and obs["image"].dtype == np.uint8
    assert obs["image"].min() < 128 < obs["image"].max()  # a drawn scene, not a blank frame
    assert env.observation_space.contains(obs)
    assert env.render().shape == (64, 64, 3)


def test_invalid_arguments_name_the_value():
    with pytest.raises(ValueError, match="obs_type='pixels'"):
        PushTEnv(obs_type="pixels")
    env = PushTEnv()
    with pytest.raises(ValueError, match=r"\(4,\)"):
        env.reset(options={"reset_to_state": [1.0, 2.0, 3.0, 4.0]})
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        env.step(np.zeros(3))


def test_coverage_equals_gym_pusht():
    env = PushTEnv()
    for seed in range(5):
        env.reset(seed=seed)
        assert env._get_coverage() == pytest.approx(GymPushTEnv._get_coverage(env), abs=1e-12)
    goal = [100.0, 100.0, 256.0, 256.0, np.pi / 4]  # the block on its goal pose
    _, info = env.reset(options={"reset_to_state": goal, "angle_first": True})
    assert info["coverage"] == pytest.approx(1.0, abs=1e-9) and info["is_success"]
    _, info = env.reset(options={"reset_to_state": goal})  # legacy order shifts the block
    assert info["coverage"] < 0.95


def test_seeded_reset_is_the_paper_protocol():
    drawn = protocol_initial_state(100000)
    rs = np.random.RandomState(100000)
    expected = [rs.randint(50, 450), rs.randint(50, 450), rs.randint(100, 400)]
    expected += [rs.randint(100, 400), rs.randn() * 2 * np.pi - np.pi]
    np.testing.assert_array_equal(drawn, expected)

    env = PushTEnv()
    obs, _ = env.reset(seed=100000)
    state = env.get_state()
    np.testing.assert_array_equal(state[:2], drawn[:2])
    np.testing.assert_array_equal(obs["agent_pos"], drawn[:2].astype(np.float32))
    assert np.cos(state[4] - drawn[4]) == pytest.approx(1.0, abs=1e-15)
    # Legacy order: the angle, set after the position, turns the block about its centre of
    # gravity, so the position moves off the drawn one, exactly as gym-pusht's own reset does.
    ref = GymPushTEnv(obs_type="state")
    ref_state, _ = ref.reset(options={"reset_to_state": drawn})
    np.testing.assert_allclose(state[2:4], ref_state[2:4], atol=1e-9)
    assert np.abs(state[2:4] - drawn[2:4]).max() > 1.0

    again, _ = env.reset(seed=100000)
    np.testing.assert_array_equal(again["keypoint"], obs["keypoint"])
    other, _ = env.reset(seed=100001)
    assert not np.array_equal(other["agent_pos"], obs["agent_pos"])


def test_unseeded_resets_follow_the_env_generator():
    a, b = PushTEnv(), PushTEnv()
    a.reset(seed=7)
    b.reset(seed=7)
    obs_a, _ = a.reset()
    obs_b, _ = b.reset()
    np.testing.assert_array_equal(obs_a["keypoint"], obs_b["keypoint"])
    assert a.episode_seed == b.episode_seed != 7


def test_reset_to_dataset_state_gives_dataset_observation(pusht_lowdim_arrays):
    state, keypoint = pusht_lowdim_arrays["state"], pusht_lowdim_arrays["keypoint"]
    env = PushTEnv()
    for t in [0, 100, 5000, 12345, 20000, 25649]:
        obs, _ = env.reset(options={"reset_to_state": state[t], "angle_first": True})
        np.testing.assert_allclose(obs["keypoint"], keypoint[t].reshape(18), atol=0.02)
        np.testing.assert_array_equal(obs["agent_pos"], state[t, :2])
        np.testing.assert_allclose(env.get_state()[2:4], state[t, 2:4], atol=1e-3)


def test_replaying_actions_tracks_the_recording(pusht_lowdim_arrays):
    data = pusht_lowdim_arrays
    end = int(data["episode_ends"][0])  # episode 0: 161 steps
    env = make_pusht_env(max_episode_steps=end)
    obs, _ = env.reset(options={"reset_to_state": data["state"][0], "angle_first": True})
    pos_err, kp_err = [], []
    for t in range(end):
        pos_err.append(np.abs(env.unwrapped.get_state()[:4] - data["state"][t, :4]).max())
        kp_err.append(np.abs(obs["keypoint"] - data["keypoint"][t].reshape(18)).max())
        obs, _, terminated, truncated, _ = env.step(data["action"][t])
        assert not terminated  # demonstrations do not pass 95% coverage mid-episode
    assert truncated  # the TimeLimit of make_pusht_env
    print(f"replay of episode 0: max position error {max(pos_err):.2e} px")
    assert max(pos_err) < 1e-2
    assert max(kp_err) < 0.1


def test_vector_env_batches_dict_observations():
    envs = gym.vector.SyncVectorEnv([make_pusht_env] * 2)
    obs, _ = envs.reset(seed=[100000, 100001])
    assert obs["keypoint"].shape == (2, 18) and obs["agent_pos"].shape == (2, 2)
    np.testing.assert_array_equal(obs["agent_pos"][0], protocol_initial_state(100000)[:2])
    envs.close()
