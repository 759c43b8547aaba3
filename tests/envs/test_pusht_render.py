"""The image env renders a recorded state as the dataset's stored 96x96 frame.

Tolerance: a frame matches when its mean absolute difference is at most 0.25 levels (of 0..255)
and at most 0.6% of its values differ by more than 10 levels. Over every 8th frame of the
dataset (3,346 frames) the rendering gives a mean of 0.08 (worst 0.195) and at most 0.51% of
values off by > 10; the differing pixels lie on the edges of the T, the agent and the goal (42
of 43 in the worst frame tested here). Exact equality is not expected: pygame fills the shapes
at 512x512 and cv2 resizes to 96, so an edge pixel flips when a pose moves by a fraction of a
pixel, and the stored frames sit up to about 1 px (of 512) from their float32 states. The
tolerance admits pose errors up to about 2 px or 0.02 rad in the 512 px world (0.4 px at 96);
a 4 px shift, a 0.05 rad turn, or gym-pusht's angle-last reset order (1.3-5% of values off) fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from diffusion_policy.envs.pusht_env import PushTEnv

CHUNK = 161  # data/img is chunked by 161 frames: read three chunks, test every 10th frame
STEPS = [c * CHUNK + i for c in (0, 80, 158) for i in range(0, CHUNK, 10)]
MAX_MEAN_DIFF = 0.25
MAX_FRACTION_OFF = 0.006  # values differing by more than OFF_LEVELS
OFF_LEVELS = 10


@pytest.fixture(scope="module")
def recorded(pusht_zarr_path) -> tuple[np.ndarray, np.ndarray]:
    """States (S, 5) and stored frames (S, 96, 96, 3) uint8 at STEPS."""
    root = zarr.open_group(str(pusht_zarr_path), mode="r")
    state = np.asarray(root["data/state"][:])
    img = root["data/img"]
    frames = {c: img[c * CHUNK : (c + 1) * CHUNK] for c in {s // CHUNK for s in STEPS}}
    stored = np.stack([frames[s // CHUNK][s % CHUNK] for s in STEPS])
    assert np.array_equal(stored, stored.astype(np.uint8))  # integral 0..255 as float32
    return state[STEPS], stored.astype(np.uint8)


def _render(env: PushTEnv, state: np.ndarray, angle_first: bool = True) -> dict[str, np.ndarray]:
    obs, _ = env.reset(options={"reset_to_state": state, "angle_first": angle_first})
    return obs


def _diff_stats(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), float((d > OFF_LEVELS).mean())


def test_rendering_matches_stored_frames(recorded):
    states, stored = recorded
    env = PushTEnv(obs_type="image", image_size=96)
    for step, state, frame in zip(STEPS, states, stored, strict=True):
        obs = _render(env, state)
        assert obs["image"].shape == frame.shape == (96, 96, 3)
        assert obs["image"].dtype == np.uint8  # the layout and dtype PushTImageDataset serves
        np.testing.assert_array_equal(obs["agent_pos"], state[:2])
        mean, off = _diff_stats(obs["image"], frame)
        assert mean <= MAX_MEAN_DIFF and off <= MAX_FRACTION_OFF, (
            f"step {step}: mean |diff| {mean:.3f} levels, {off:.2%} of values off by > "
            f"{OFF_LEVELS} (tolerance {MAX_MEAN_DIFF}, {MAX_FRACTION_OFF:.1%})"
        )


def test_tolerance_rejects_a_wrong_pose(recorded):
    states, stored = recorded
    env = PushTEnv(obs_type="image", image_size=96)
    legacy = [_diff_stats(_render(env, s, angle_first=False)["image"], f)[1] for s, f in
              zip(states, stored, strict=True)]  # fmt: skip
    assert min(legacy) > 2 * MAX_FRACTION_OFF
    for offset in ([0, 0, 4.0, 0, 0], [0, 0, 0, 4.0, 0], [0, 0, 0, 0, 0.05]):
        mean, off = _diff_stats(_render(env, states[0] + offset)["image"], stored[0])
        assert mean > MAX_MEAN_DIFF or off > MAX_FRACTION_OFF, offset
