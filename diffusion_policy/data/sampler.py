"""Fixed-length windows over the episodes of a replay buffer, padded at the episode edges."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from diffusion_policy.data.errors import DatasetError
from diffusion_policy.utils.checks import check_window


class SequenceSampler:
    """Windows of ``horizon`` steps, each inside one episode, with edge frames repeated.

    A window of episode ``e`` (start ``s``, length ``L``) starts at ``s + k`` for
    ``k = -pad_before .. L - horizon + pad_after`` with ``pad_before = n_obs_steps - 1`` and
    ``pad_after = n_action_steps - 1``; steps before ``s`` repeat the episode's first frame and
    steps at or after ``s + L`` its last frame. So every step can be the last observed one, and
    the actions executed from it are real up to the end of the episode. An episode contributes
    ``max(0, L - horizon + pad_before + pad_after + 1)`` windows.

    Args:
        data: ``{key: (n_steps, ...)}`` arrays indexed by global step.
        episode_ends: Exclusive end index of each episode, ``(n_episodes,)``.
        horizon: Window length T.
        n_obs_steps: Observed frames To; ``obs_keys`` get only the first To frames of a window.
        n_action_steps: Actions executed per policy call; sets the padding after the end.
        obs_keys: Keys that get ``n_obs_steps`` frames; the others get ``horizon`` frames.
        episode_mask: Which episodes to draw windows from, ``(n_episodes,)`` bool; all if None.
    """

    def __init__(
        self,
        data: Mapping[str, np.ndarray],
        episode_ends: np.ndarray,
        horizon: int,
        n_obs_steps: int = 1,
        n_action_steps: int = 1,
        obs_keys: Iterable[str] = (),
        episode_mask: np.ndarray | None = None,
    ) -> None:
        # Windows are padded: each size only needs to fit in the horizon.
        check_window(horizon, n_obs_steps, n_action_steps, covered=False)
        ends = np.asarray(episode_ends, dtype=np.int64)
        obs_keys = set(obs_keys)
        unknown = sorted(obs_keys - set(data))
        if unknown:
            raise DatasetError(f"obs_keys {unknown} are not among the data keys {sorted(data)}")
        if episode_mask is None:
            episode_mask = np.ones(len(ends), dtype=bool)
        episode_mask = np.asarray(episode_mask, dtype=bool)
        if episode_mask.shape != ends.shape:
            raise ValueError(
                f"episode_mask has shape {episode_mask.shape}, expected ({len(ends)},) episodes"
            )
        self.data = dict(data)
        self.horizon = horizon
        self.n_obs_steps = n_obs_steps
        self.pad_before = n_obs_steps - 1
        self.pad_after = n_action_steps - 1
        # Frames per key: observations need only the first To steps of the window.
        self.key_steps = {k: n_obs_steps if k in obs_keys else horizon for k in self.data}
        self.indices = self._build_index_table(ends, episode_mask)  # (N, T) global steps

    def _build_index_table(self, ends: np.ndarray, mask: np.ndarray) -> np.ndarray:
        starts = np.concatenate([[0], ends[:-1]])[mask]
        lengths = (ends - np.concatenate([[0], ends[:-1]]))[mask]
        counts = np.maximum(0, lengths - self.horizon + self.pad_before + self.pad_after + 1)
        n = int(counts.sum())
        # Offset k of each window within its episode: -pad_before, -pad_before + 1, ...
        first_window = np.cumsum(counts) - counts
        k = np.arange(n) - np.repeat(first_window, counts) - self.pad_before  # (N,)
        rel = k[:, None] + np.arange(self.horizon)[None, :]  # (N, T) step within the episode
        rel = np.clip(rel, 0, np.repeat(lengths, counts)[:, None] - 1)  # repeat the edge frames
        return (rel + np.repeat(starts, counts)[:, None]).astype(np.intp)

    def __len__(self) -> int:
        return len(self.indices)

    def sample(self, idx: int) -> dict[str, np.ndarray]:
        """Window ``idx``: ``{key: (T_key, ...)}`` with T_key = To for obs keys, else T."""
        steps = self.indices[idx]  # (T,)
        return {k: arr[steps[: self.key_steps[k]]] for k, arr in self.data.items()}

    def sample_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Windows ``indices`` at once: ``{key: (B, T_key, ...)}`` by one fancy index per key."""
        steps = self.indices[np.asarray(indices, dtype=np.intp)]  # (B, T)
        return {k: arr[steps[:, : self.key_steps[k]]] for k, arr in self.data.items()}
