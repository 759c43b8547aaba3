"""One action per control tick from a policy that predicts chunks of actions.

A diffusion policy maps the last ``n_obs_steps`` observations to a chunk of actions; a robot
wants one action per tick. The controller keeps the observation history (the first observation
repeated after a reset, as in training) and the planned actions, plans when they run out and
hands out one action per :meth:`BatchController.act`. The rollout runner drives the same
:class:`BatchController`, so what is scored is what is deployed.

Timing: a chunk planned at tick ``t`` conditions on the observations of ticks ``t - To + 1 .. t``
(the one given to that ``act`` call being the newest), and its action ``i`` is the action of tick
``t + i`` (the policy's chunk starts at the last observed step). Of each chunk the first
``n_action_steps`` actions are used.

Options, all off by default (the runner's protocol: plan when the chunk runs out, execute it):

- ``replan_at=k``: plan the next chunk when ``k`` actions of the current one remain. With
  ``background=True`` the plan runs in a thread while the remaining actions are executed
  (latency hiding): the ``act`` that starts it returns at once, and the new chunk is used from
  the first tick after it is ready. It conditions on the observations up to the tick it
  started at; its actions for the ticks that passed meanwhile are dropped, so a plan must take
  less than ``k`` ticks for the robot never to wait. Without a thread the plan runs inside
  ``act`` and its chunk is used at once.
- ``ensemble_decay=m``: temporal ensembling of overlapping chunks, as in ACT (Zhao et al.,
  2023): the action of a tick is the average of every kept chunk's action for it, weighted
  ``exp(-m * i)`` with ``i = 0`` for the oldest chunk. Chunks overlap only when planned early,
  so it needs ``replan_at >= 1``; ``replan_at = n_action_steps - 1`` plans at every tick.
- ``coherence_samples=K``: backward coherence, as in bidirectional decoding (Liu et al., 2024):
  each plan samples ``K`` chunks per robot and keeps the one whose predicted actions agree best
  (least squared distance) with what the previous plan predicted for the same ticks, so that
  re-planning often does not hop between modes of the policy from one plan to the next. It
  needs the policy's whole prediction, ``"action_pred"`` (B, H, Da) with index
  ``n_obs_steps - 1`` at the planning tick (as :class:`DiffusionPolicy` returns it), and costs
  ``K`` times the sampling.

Sampling noise: with a ``seed``, chunk ``j`` after a reset is sampled with a fresh
``torch.Generator`` seeded from ``(seed, j)``, so a session's actions do not depend on the
process or on other sessions (a policy server reproduces them from the generator's seed).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from diffusion_policy.data.keys import ACTION

log = logging.getLogger(__name__)

# The key of a non-dict observation (e.g. a vector env's array), as the runner names it.
OBS_KEY = "obs"

Observation = Mapping[str, np.ndarray] | np.ndarray
Seed = int | Sequence[int]


class ChunkPolicy(Protocol):
    """What the controller needs of a policy (``generator`` is passed only with a seed)."""

    def predict_action(self, obs: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, Any]:
        """Maps observations {key: (B, To, ...)} to ``{"action": (B, Ta, Da), ...}``."""
        ...


@dataclass
class _Chunk:
    """Planned actions (B, n, Da); ``actions[:, i]`` is for tick ``start + i``."""

    start: int
    actions: np.ndarray  # (B, n, Da)
    future: np.ndarray | None = None  # (B, H', Da) all predicted actions from tick start on

    @property
    def end(self) -> int:
        return self.start + self.actions.shape[1]


@dataclass
class _Request:
    """What a plan conditions on, taken when it starts."""

    obs: dict[str, torch.Tensor]  # {key: (B, To, ...)}
    start: int
    generator: torch.Generator | None


class BatchController:
    """Runs B robots (or envs) in lockstep: one (B, Da) action per :meth:`act`.

    Args:
        policy: Any object with ``predict_action`` (see :class:`ChunkPolicy`).
        n_obs_steps: Observation frames given to the policy (To); the policy's if None.
        n_action_steps: Actions used of each chunk (Ta); the policy's if None.
        device: Where observation tensors go; CPU if None.
        action_dim: Checks the policy's actions have this size when given.
        replan_at: Plan the next chunk when this many actions of the current one remain
            (0: when it runs out).
        background: Plan in a thread (latency hiding); needs ``replan_at >= 1``.
        ensemble_decay: Temporal ensembling of overlapping chunks with weights
            ``exp(-ensemble_decay * i)``, oldest first; None takes the newest chunk's action.
        seed: Seeds the sampling noise of each chunk (see the module docstring); None leaves
            it to the policy (the global random generator).
        coherence_samples: Chunks sampled per plan, of which the one that agrees best with
            the previous plan is kept (see the module docstring); 1 keeps every sample.

    Raises:
        ValueError: A size or option out of range, naming it.
    """

    def __init__(
        self,
        policy: ChunkPolicy,
        n_obs_steps: int | None = None,
        n_action_steps: int | None = None,
        *,
        device: str | torch.device | None = None,
        action_dim: int | None = None,
        replan_at: int = 0,
        background: bool = False,
        ensemble_decay: float | None = None,
        seed: Seed | None = None,
        coherence_samples: int = 1,
    ) -> None:
        self.policy = policy
        self.n_obs_steps = _size(n_obs_steps, policy, "n_obs_steps")
        self.n_action_steps = _size(n_action_steps, policy, "n_action_steps")
        check_replanning(
            self.n_action_steps,
            replan_at,
            background=background,
            ensemble_decay=ensemble_decay,
            coherence_samples=coherence_samples,
        )
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.action_dim = action_dim
        self.replan_at = replan_at
        self.ensemble_decay = ensemble_decay
        self.coherence_samples = coherence_samples
        self._executor = ThreadPoolExecutor(1, "plan") if background else None
        self._seed = _check_seed(seed)
        self._history: deque[dict[str, np.ndarray]] = deque(maxlen=self.n_obs_steps)
        self._chunks: list[_Chunk] = []  # oldest first
        self._previous: _Chunk | None = None  # the last plan adopted, for coherence
        self._future: Future[_Chunk] | None = None
        self.tick = 0  # act() calls since the reset: the index of the next tick
        self.planned: np.ndarray | None = None  # the policy's (B, Ta, Da) adopted at this tick
        self.last_wait_s = 0.0  # seconds the last act() waited for a plan
        self.n_plans = 0  # chunks planned since the reset

    # -- public -----------------------------------------------------------------------------
    def reset(self, seed: Seed | None = None) -> None:
        """Starts a new episode: forgets the observations and actions.

        Args:
            seed: Seeds this episode's sampling noise; None keeps the constructor's seed.
        """
        self._drop_plan_in_flight()
        if seed is not None:
            self._seed = _check_seed(seed)
        self._history.clear()
        self._chunks.clear()
        self._previous = None
        self.tick = 0
        self.planned = None
        self.last_wait_s = 0.0
        self.n_plans = 0

    def act(self, obs: Observation) -> np.ndarray:
        """Takes this tick's observations and returns its actions.

        Args:
            obs: ``{key: (B, ...)}`` arrays, or one (B, ...) array (kept under ``"obs"``).
                Non-uint8 values reach the policy as float32; uint8 (images) stay uint8.

        Returns:
            (B, Da) float32 actions.

        Raises:
            KeyError, ValueError: The policy's output has no ``"action"`` or a wrong shape.
            Exception: What the policy raised, also from a background plan.
        """
        self._observe(obs)
        self.planned = None
        self.last_wait_s = 0.0
        if self._future is not None and (self._future.done() or self._remaining() == 0):
            self._adopt(self._wait(self._future))  # waits only if no action is left
            self._future = None
        if self._future is None and self._remaining() <= self.replan_at:
            request = self._request()
            if self._executor is not None and self._remaining() > 0:
                self._future = self._executor.submit(self._plan, request)
            else:
                tic = time.perf_counter()
                self._adopt(self._plan(request))
                self.last_wait_s = time.perf_counter() - tic
        action = self._select()  # (B, Da)
        self.tick += 1
        self._chunks = [c for c in self._chunks if c.end > self.tick]
        return action

    def close(self) -> None:
        """Stops the planning thread (a plan in flight is finished and dropped)."""
        self._drop_plan_in_flight()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def __enter__(self) -> BatchController:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- observations -----------------------------------------------------------------------
    def _observe(self, obs: Observation) -> None:
        frame = dict(obs) if isinstance(obs, Mapping) else {OBS_KEY: obs}
        frame = {key: np.asarray(value) for key, value in frame.items()}
        if self._history and frame.keys() != self._history[-1].keys():
            raise ValueError(
                f"observation keys {sorted(frame)} differ from the previous tick's "
                f"{sorted(self._history[-1])}"
            )
        if not self._history:  # after a reset: the first observation fills the history
            self._history.extend([frame] * self.n_obs_steps)
        else:
            self._history.append(frame)

    def _request(self) -> _Request:
        obs = {}
        for key in self._history[-1]:
            stacked = np.stack([f[key] for f in self._history], axis=1)  # (B, To, ...)
            if stacked.dtype != np.uint8:
                stacked = stacked.astype(np.float32, copy=False)
            obs[key] = torch.from_numpy(stacked).to(self.device)
        generator = None
        if self._seed is not None:
            entropy = np.random.SeedSequence([*self._seed, self.n_plans])
            generator = torch.Generator().manual_seed(int(entropy.generate_state(1)[0]))
        self.n_plans += 1
        return _Request(obs=obs, start=self.tick, generator=generator)

    # -- planning ---------------------------------------------------------------------------
    def _plan(self, request: _Request) -> _Chunk:
        k = self.coherence_samples
        obs = request.obs
        if k > 1:  # k samples per robot, sample-major: row j * B + b
            obs = {key: v.repeat(k, *[1] * (v.dim() - 1)) for key, v in obs.items()}
        kwargs = {} if request.generator is None else {"generator": request.generator}
        with torch.no_grad():  # thread-local: set here for a background thread too
            out = self.policy.predict_action(obs, **kwargs)
        batch = next(iter(obs.values())).shape[0]
        need = (
            f"n_action_steps={self.n_action_steps}: execute fewer, or have the policy return "
            "more (DiffusionPolicy.set_n_action_steps)"
        )
        action = self._checked_actions(out, ACTION, batch, self.n_action_steps, need)
        if k == 1:
            return _Chunk(start=request.start, actions=action)  # (B, Ta, Da)
        need = f"n_obs_steps={self.n_obs_steps}: action_pred must reach the planning tick"
        pred = self._checked_actions(out, "action_pred", batch, self.n_obs_steps, need)
        future = pred[:, self.n_obs_steps - 1 :]  # (k * B, H', Da) from the planning tick on
        pick = self._most_coherent(future.reshape(k, batch // k, *future.shape[1:]), request)
        rows = pick * (batch // k) + np.arange(batch // k)  # (B,)
        return _Chunk(start=request.start, actions=action[rows], future=future[rows])

    def _checked_actions(
        self, out: Mapping[str, Any], key: str, batch: int, length: int, need: str
    ) -> np.ndarray:
        """``out[key]`` as a float32 (batch, n >= length, Da) array, or an error naming what is
        wrong (``need`` says what asks for ``length``)."""
        if key not in out:
            raise KeyError(f"predict_action must return an {key!r} entry, got keys {list(out)}")
        action = out[key]
        if isinstance(action, torch.Tensor):
            action = action.detach().float().cpu().numpy()
        action = np.asarray(action, dtype=np.float32)
        expected = f"({batch}, Ta, {self.action_dim if self.action_dim is not None else 'Da'})"
        if (
            action.ndim != 3
            or action.shape[0] != batch
            or action.shape[1] < 1
            or (self.action_dim is not None and action.shape[2] != self.action_dim)
        ):
            raise ValueError(
                f"predict_action returned {key} of shape {tuple(action.shape)}, expected {expected}"
            )
        if action.shape[1] < length:
            raise ValueError(
                f"predict_action returned chunks of {action.shape[1]} actions, fewer than {need}"
            )
        return action

    def _most_coherent(self, futures: np.ndarray, request: _Request) -> np.ndarray:
        """Per robot, the sample (K, B, H', Da) closest to the previous plan over the ticks
        both predict; sample 0 where there is no previous plan. Returns (B,) indices."""
        previous = self._previous
        if previous is None or previous.future is None:
            return np.zeros(futures.shape[1], dtype=np.int64)
        old = previous.future[:, request.start - previous.start :]  # (B, L0, Da) from now on
        overlap = min(old.shape[1], futures.shape[2])
        if overlap == 0:
            return np.zeros(futures.shape[1], dtype=np.int64)
        diff = futures[:, :, :overlap] - old[None, :, :overlap]  # (K, B, L, Da)
        return np.square(diff).sum(axis=(2, 3)).argmin(axis=0)  # (B,)

    def _wait(self, future: Future[_Chunk]) -> _Chunk:
        tic = time.perf_counter()
        chunk = future.result()
        self.last_wait_s = time.perf_counter() - tic
        return chunk

    def _adopt(self, chunk: _Chunk) -> None:
        """Keeps a planned chunk's first n_action_steps actions from this tick on."""
        self.planned = chunk.actions
        self._previous = chunk
        skip = self.tick - chunk.start  # ticks that passed while it was planned
        kept = _Chunk(self.tick, chunk.actions[:, skip : self.n_action_steps])  # (B, n, Da)
        if kept.actions.shape[1] == 0:
            log.warning(
                "controller: a chunk planned at tick %d arrived at tick %d, after its %d actions; "
                "planning again (plan earlier: raise replan_at)",
                chunk.start, self.tick, self.n_action_steps,
            )  # fmt: skip
            return
        self._chunks = [*self._chunks, kept] if self.ensemble_decay is not None else [kept]

    def _remaining(self) -> int:
        """Planned actions for this tick and later."""
        return max((c.end - self.tick for c in self._chunks), default=0)

    def _select(self) -> np.ndarray:
        actions = [c.actions[:, self.tick - c.start] for c in self._chunks if c.start <= self.tick]
        if len(actions) == 1:
            return actions[0]
        weights = np.exp(-self.ensemble_decay * np.arange(len(actions)))  # oldest first
        weights /= weights.sum()
        return np.tensordot(weights, np.stack(actions), axes=1).astype(np.float32)  # (B, Da)

    def _drop_plan_in_flight(self) -> None:
        if self._future is not None:
            self._future.cancel()
            # Its episode is over: what it raised is of no use any more.
            with contextlib.suppress(Exception):
                self._future.result()
            self._future = None


class Controller:
    """A :class:`BatchController` for one robot: unbatched observations and actions.

    Example::

        controller = Controller(policy, replan_at=2, background=True)
        controller.reset()
        while running:
            robot.apply(controller.act(robot.observe()))  # once per tick

    Args:
        policy: Any object with ``predict_action``.
        **kwargs: :class:`BatchController` arguments.
    """

    def __init__(self, policy: ChunkPolicy, **kwargs: Any) -> None:
        self.batch = BatchController(policy, **kwargs)

    def reset(self, seed: Seed | None = None) -> None:
        """Starts a new episode (see :meth:`BatchController.reset`)."""
        self.batch.reset(seed)

    def act(self, obs: Observation) -> np.ndarray:
        """This tick's action (Da,) from its observation ``{key: (...)}`` or array (...)."""
        if isinstance(obs, Mapping):
            batched: Observation = {key: np.asarray(v)[None] for key, v in obs.items()}
        else:
            batched = np.asarray(obs)[None]
        return self.batch.act(batched)[0]

    @property
    def last_wait_s(self) -> float:
        """Seconds the last :meth:`act` waited for a plan."""
        return self.batch.last_wait_s

    def close(self) -> None:
        """Stops the planning thread."""
        self.batch.close()

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_replanning(
    n_action_steps: int,
    replan_at: int,
    *,
    background: bool,
    ensemble_decay: float | None,
    coherence_samples: int = 1,
) -> None:
    """Checks the controller's planning options (see :class:`BatchController`).

    Raises:
        ValueError: An option out of range or without the one it needs, naming it.
    """
    if not 0 <= replan_at < n_action_steps:
        raise ValueError(
            f"replan_at={replan_at} must be in [0, n_action_steps - 1 = {n_action_steps - 1}]"
        )
    if background and replan_at < 1:
        raise ValueError(
            f"background planning with replan_at={replan_at} would always wait for the "
            f"chunk; use replan_at >= 1"
        )
    if ensemble_decay is not None and not (ensemble_decay >= 0 and replan_at >= 1):
        raise ValueError(
            f"ensemble_decay={ensemble_decay} must be >= 0 and needs replan_at >= 1 (got "
            f"{replan_at}) for chunks to overlap"
        )
    if int(coherence_samples) != coherence_samples or coherence_samples < 1:
        raise ValueError(f"coherence_samples={coherence_samples} must be an integer >= 1")


def _size(value: int | None, policy: Any, name: str) -> int:
    if value is None:
        value = getattr(policy, name, None)
        if value is None:
            raise ValueError(f"{name} is not given and {type(policy).__name__} has no {name}")
    if int(value) != value or value < 1:
        raise ValueError(f"{name}={value} must be an integer >= 1")
    return int(value)


def _check_seed(seed: Seed | None) -> tuple[int, ...] | None:
    if seed is None:
        return None
    parts = (seed,) if isinstance(seed, int | np.integer) else tuple(seed)
    if not parts or any(not isinstance(s, int | np.integer) or s < 0 for s in parts):
        raise ValueError(f"seed={seed!r} must be an integer >= 0 or a sequence of them")
    return tuple(int(s) for s in parts)
