"""The one check of a run's window sizes, shared by the sampler, the policy, the runner and the
config check. It imports nothing from the package, so every layer may use it."""

from __future__ import annotations


def check_window(
    horizon: int | None, n_obs_steps: int, n_action_steps: int, *, covered: bool = True
) -> None:
    """Checks the sizes of a window: ``horizon`` steps, the first ``n_obs_steps`` observed.

    A policy predicts ``horizon`` actions and executes ``n_action_steps`` of them from the last
    observed step on, so the window must cover ``n_obs_steps - 1 + n_action_steps`` steps. The
    sequence sampler pads its windows and only needs each size within the horizon
    (``covered=False``); the rollout runner has no horizon (``horizon=None``).

    Args:
        horizon: Steps in a window (predicted actions), or None to check only the other two.
        n_obs_steps: Observation frames conditioning a prediction (To).
        n_action_steps: Actions executed per prediction (Ta).
        covered: Also require ``horizon >= n_obs_steps - 1 + n_action_steps``.

    Raises:
        ValueError: Naming the size that is out of range, with the others it is compared to.
    """
    if horizon is not None and horizon < 1:
        raise ValueError(f"horizon={horizon} must be >= 1")
    for name, steps in (("n_obs_steps", n_obs_steps), ("n_action_steps", n_action_steps)):
        if steps < 1:
            raise ValueError(f"{name}={steps} must be >= 1")
        if horizon is not None and steps > horizon:
            raise ValueError(f"{name}={steps} must be in [1, horizon={horizon}]")
    if covered and horizon is not None and n_obs_steps - 1 + n_action_steps > horizon:
        raise ValueError(
            f"horizon={horizon} is too short for n_obs_steps={n_obs_steps} and "
            f"n_action_steps={n_action_steps}: needs at least n_obs_steps - 1 + n_action_steps "
            f"= {n_obs_steps - 1 + n_action_steps}"
        )
