"""Open-loop probe: how much a BlockPush policy's next move follows the pusher's own motion.

Behaviour cloning from observation histories invites the copycat shortcut: in demonstrations
the next move is much like the last one, so a policy can learn to keep its own pace. In closed
loop a policy whose moves come out a little short then sees a slower pusher and moves slower
still. The probe samples the policy on demonstration windows whose older frames show the
pusher's own motion scaled (:func:`~diffusion_policy.envs.blockpush_actions.scale_own_motion`:
0 at rest, 1 as recorded, 2 twice as fast) and compares the predicted next move with the
demonstrated one. A policy free of the shortcut predicts the same moves at every scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffusion_policy.data.keys import ACTION, OBS
from diffusion_policy.data.sequence_dataset import SequenceDataset
from diffusion_policy.envs.blockpush_actions import TARGET_XY, scale_own_motion
from diffusion_policy.policies.diffusion_policy import DiffusionPolicy


@torch.no_grad()
def own_motion_probe(
    policy: DiffusionPolicy,
    obs: torch.Tensor,
    targets: torch.Tensor,
    scales: Sequence[float] = (0.0, 0.5, 1.0, 2.0),
    abs_action: bool = True,
    seed: int = 0,
) -> dict[float, dict[str, float]]:
    """The policy's predicted next moves on windows with the pusher's past motion scaled.

    Args:
        policy: A BlockPush policy (its observation key ``"obs"``).
        obs: Demonstration observation windows (N, To, 16), To the policy's ``n_obs_steps``.
        targets: The effector target each window's demonstration set next (N, 2).
        scales: Factors on the older frames' own motion.
        abs_action: Whether the policy's actions are targets (else relative moves).
        seed: Seed of the sampling noise (the same draws at every scale).

    Returns:
        Per scale: ``move`` (mean length of the predicted next move, metres), ``demo_move``
        (of the demonstrated one), ``error`` (mean distance between the two) and ``cosine``
        (mean cosine between them, over windows where both move at least 1 mm).
    """
    if obs.ndim != 3 or obs.shape[1] != policy.n_obs_steps:
        raise ValueError(
            f"obs windows have shape {tuple(obs.shape)}; expected (N, {policy.n_obs_steps}, 16)"
        )
    current_target = obs[:, -1, list(TARGET_XY)]  # (N, 2)
    demo = targets - current_target  # (N, 2)
    results = {}
    for scale in scales:
        scaled = scale_own_motion(obs, torch.full((len(obs),), float(scale)))
        generator = torch.Generator().manual_seed(seed)
        action = policy.predict_action({OBS: scaled}, generator=generator)[ACTION][:, 0]  # (N, 2)
        move = action - current_target if abs_action else action
        length, demo_length = move.norm(dim=1), demo.norm(dim=1)
        both = (length > 1e-3) & (demo_length > 1e-3)
        cosine = (move * demo).sum(1)[both] / (length * demo_length)[both]
        results[float(scale)] = {
            "move": float(length.mean()),
            "demo_move": float(demo_length.mean()),
            "error": float((move - demo).norm(dim=1).mean()),
            "cosine": float(cosine.mean()) if both.any() else float("nan"),
        }
    return results


def probe_windows(
    dataset: SequenceDataset, n: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random windows of a BlockPush dataset with ``abs_action`` (seeded): their
    observations (n, To, 16) and the target set at the current step (n, 2)."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(dataset), size=min(n, len(dataset)), replace=False)
    batch = dataset.get_batch(sorted(idx.tolist()))
    obs = batch[OBS][OBS]  # (n, To, 16)
    return obs, batch[ACTION][:, obs.shape[1] - 1]
