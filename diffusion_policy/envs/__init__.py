"""Simulation: the Push-T env adapter on gym-pusht, video recording and the rollout runner."""

from diffusion_policy.envs.episodes import EpisodeResult
from diffusion_policy.envs.pusht_env import (
    BLOCK_KEYPOINTS_LOCAL,
    PushTEnv,
    block_keypoints,
    make_pusht_env,
    protocol_initial_state,
)
from diffusion_policy.envs.runner import EnvRunner, PushTRunner
from diffusion_policy.envs.scoring import EpisodeScore, MaxRewardScorer, Scorer
from diffusion_policy.envs.video import FrameRecorder, write_video

__all__ = [
    "BLOCK_KEYPOINTS_LOCAL",
    "EnvRunner",
    "EpisodeResult",
    "EpisodeScore",
    "FrameRecorder",
    "MaxRewardScorer",
    "PushTEnv",
    "PushTRunner",
    "Scorer",
    "block_keypoints",
    "make_pusht_env",
    "protocol_initial_state",
    "write_video",
]
