"""Drives Push-T through a policy server: the loop a robot runs, with the simulator as robot.

    python scripts/serve.py checkpoint=exports/pusht &              # terminal 1
    python scripts/pusht_client.py --episodes 5 --background        # terminal 2

Each tick sends nothing but the newest observation to the local controller, which asks the
server for a chunk when it needs one (with ``--background``, ahead of time in a thread).
With ``--sampling-seed S`` an episode's noise is seeded from ``(S, env seed)``: its score is
the one ``EnvRunner(n_envs=1, sampling_seed=S)`` gives in-process.
"""

from __future__ import annotations

import argparse
import os

from diffusion_policy.deploy.client import PolicyClient
from diffusion_policy.deploy.controller import Controller
from diffusion_policy.envs.pusht_env import make_pusht_env


def run_episode(
    controller: Controller, env_seed: int, max_steps: int = 300, sampling_seed: int | None = None
) -> float:
    """One Push-T episode; returns its score (the maximum reward: the best goal coverage)."""
    env = make_pusht_env(obs_type="keypoint")
    try:
        obs, _ = env.reset(seed=env_seed)
        controller.reset(seed=None if sampling_seed is None else [sampling_seed, env_seed])
        best = 0.0
        for _ in range(max_steps):
            obs, reward, terminated, truncated, _ = env.step(controller.act(obs))
            best = max(best, float(reward))
            if terminated or truncated:
                break
        return best
    finally:
        env.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", default="tcp://127.0.0.1:5555")
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--start-seed", type=int, default=100000)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--sampling-seed", type=int, default=None)
    parser.add_argument("--background", action="store_true", help="plan ahead in a thread")
    parser.add_argument("--replan-at", type=int, default=2, help="with --background")
    args = parser.parse_args()
    token = os.environ.get("DP_SERVE_TOKEN")
    with PolicyClient(args.address, token=token) as client:
        options = {"replan_at": args.replan_at, "background": True} if args.background else {}
        with client.controller(**options) as controller:
            scores = []
            for seed in range(args.start_seed, args.start_seed + args.episodes):
                scores.append(run_episode(controller, seed, args.max_steps, args.sampling_seed))
                print(f"seed {seed}: score {scores[-1]:.3f}")
    print(f"mean score {sum(scores) / len(scores):.3f} over {len(scores)} episodes")


if __name__ == "__main__":
    main()
