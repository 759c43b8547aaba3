"""Recording rollout frames inside (vector) environments and writing them as MP4."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import imageio.v3 as iio
import numpy as np


class FrameRecorder(gym.Wrapper):
    """Keeps the frames of ``env.render()`` after each reset and step while ``recording``.

    Frames stay in the (sub-)process of the env until :meth:`pop_frames`; a vector env toggles
    recording per sub-env with ``set_attr("recording", [...])`` and collects with
    ``call("pop_frames")``. Turning recording off keeps the frames already taken, so an episode's
    video is not clobbered by the vector env's autoreset after it ends.
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.recording = False
        self._frames: list[np.ndarray] = []

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        out = self.env.reset(**kwargs)
        if self.recording:
            self._frames.append(self.env.render())
        return out

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        out = self.env.step(action)
        if self.recording:
            self._frames.append(self.env.render())
        return out

    def pop_frames(self) -> list[np.ndarray]:
        """Returns the frames taken so far, (H, W, 3) uint8 each, and forgets them."""
        frames, self._frames = self._frames, []
        return frames


def write_video(path: str | Path, frames: Sequence[np.ndarray], fps: int = 10) -> Path:
    """Writes RGB frames as an H.264 MP4.

    Args:
        path: Output file; parent folders are created.
        frames: (H, W, 3) uint8 frames. Odd sides are padded by one edge pixel (yuv420p needs
            even sides).
        fps: Frames per second.

    Returns:
        The path written.
    """
    if len(frames) == 0:
        raise ValueError(f"no frames to write to {path}")
    video = np.stack(frames)  # (T, H, W, 3)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"frames must be (H, W, 3) RGB, got a stack of shape {video.shape}")
    _, h, w, _ = video.shape
    video = np.pad(video, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, video.astype(np.uint8), plugin="pyav", codec="libx264", fps=fps)
    return path
