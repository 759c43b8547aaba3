"""Rollouts of BlockPush on the paper's protocol, scored by p1 / p2 and the modes taken."""

from __future__ import annotations

from functools import partial
from typing import Any

from diffusion_policy.envs.blockpush_env import (
    MAX_EPISODE_STEPS,
    check_layout,
    make_blockpush_env,
)
from diffusion_policy.envs.blockpush_scoring import BlockPushScorer
from diffusion_policy.envs.runner import EnvRunner


class BlockPushRunner(EnvRunner):
    """:class:`EnvRunner` on :class:`~diffusion_policy.envs.blockpush_env.BlockPushEnv`.

    Defaults are the paper's protocol (50 test seeds from 100000, 6 train seeds from 0, 350
    steps, To=2, 8 actions per plan) and its scorer (:class:`BlockPushScorer`).

    Args:
        render_size: Side in pixels of video frames.
        abs_action: The policy's actions are effector targets (x, y), not moves (its dataset's
            ``abs_action``).
        layout: The env's initial poses, "paper" or "wide" (its dataset's ``layout``).
        **kwargs: :class:`EnvRunner` arguments.
    """

    def __init__(
        self,
        render_size: int = 96,
        abs_action: bool = False,
        layout: str = "paper",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("max_steps", MAX_EPISODE_STEPS)
        kwargs.setdefault("scorer", BlockPushScorer())
        env_fn = partial(
            make_blockpush_env,
            render_size=render_size,
            abs_action=abs_action,
            layout=check_layout(layout),
        )
        super().__init__(env_fn=env_fn, **kwargs)
