"""Property tests over the config surface: a bad value is a clear error, never a hang or a run.

Each example composes the training config with one bad override and builds the run (the
Trainer, on a small store, with the env runner) or composes it; it must fail with an error that
names the key or the value.
"""

from __future__ import annotations

import signal
import string
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig

from diffusion_policy.data.replay_buffer import ReplayBuffer
from diffusion_policy.training.trainer import Trainer

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
HANG_S = 60  # an example taking this long counts as a hang
# What a bad value may raise (Hydra wraps what a _target_ raises in InstantiationException).
CLEAR_ERRORS = (ValueError, ConfigCompositionException, InstantiationException)

_words = st.text(alphabet=string.ascii_letters, min_size=1, max_size=8)
_not_int = st.one_of(
    _words,
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x)),
    st.booleans(),
)


def _ints_below(low: int) -> st.SearchStrategy:
    return st.integers(-(10**6), low - 1)


def _bad_int(low: int, nullable: bool = False) -> st.SearchStrategy:
    """Integers below ``low``, non-integers and (unless nullable) null."""
    bad = [_ints_below(low), _not_int]
    return st.one_of(*bad, *([] if nullable else [st.none()]))


# override key -> strategy of bad values. The base run: +debug=fast (horizon 16, To 2, Ta 8).
BAD_VALUES = {
    "seed": _bad_int(0),
    "horizon": st.one_of(_bad_int(1), st.integers(1, 8)),  # too short for To - 1 + Ta = 9
    "n_obs_steps": st.one_of(_bad_int(1), st.integers(10, 10**4)),
    "n_action_steps": st.one_of(_bad_int(1), st.integers(16, 10**4)),
    "trainer.num_epochs": _bad_int(1),
    "trainer.batch_size": st.one_of(_bad_int(1), st.integers(10**6, 10**9)),  # > windows
    "trainer.num_workers": _bad_int(0),
    "trainer.log_every": _bad_int(1),
    "trainer.val_every": _bad_int(0, nullable=True),
    "trainer.rollout_every": _bad_int(0, nullable=True),
    "trainer.checkpoint_every": _bad_int(0, nullable=True),
    "trainer.topk": _bad_int(0),
    "trainer.max_train_steps_per_epoch": _bad_int(1, nullable=True),
    "trainer.max_nonfinite_steps": _bad_int(1),
    "trainer.grad_clip_norm": st.one_of(st.floats(max_value=0), _words, st.just(float("inf"))),
    "dataset.val_ratio": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0)),
    "dataset.max_train_episodes": _ints_below(1),
    "env_runner.n_test": _ints_below(0),
    "env_runner.max_steps": _ints_below(1),
    "env_runner.n_envs": _ints_below(1),
    "env_runner.n_videos": st.one_of(_ints_below(0), st.integers(3, 100)),  # n_test=2
    "env_runner.vectorization": _words,
    "env_runner.step_timeout_s": st.floats(max_value=0),
    "logger.mode": _words,
}


def _override(key: str, value) -> str:
    if value is None:
        return f"{key}=null"
    if isinstance(value, str):
        return f"{key}='{value}'"  # quoted: always a string, never parsed as a number
    if isinstance(value, float) and not np.isfinite(value):
        return f"{key}={'inf' if value > 0 else '-inf'}"
    return f"{key}={value!r}".replace("True", "true").replace("False", "false")


@contextmanager
def _no_hang(seconds: int) -> Iterator[None]:
    def timeout(signum, frame):
        raise TimeoutError(f"hung for {seconds} s")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    """A Push-T-shaped store of 4 episodes (150 steps)."""
    buffer = ReplayBuffer.create_empty()
    rng = np.random.default_rng(0)
    for n in (30, 35, 40, 45):
        buffer.add_episode(
            {
                "state": rng.uniform(0, 512, (n, 5)).astype(np.float32),
                "keypoint": rng.uniform(0, 512, (n, 9, 2)).astype(np.float32),
                "action": rng.uniform(0, 512, (n, 2)).astype(np.float32),
            }
        )
    return buffer.save(tmp_path_factory.mktemp("store") / "tiny.zarr")


def _compose(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@settings(
    max_examples=12,
    deadline=None,  # Trainer builds vary with machine load; _no_hang catches real hangs
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_bad_config_value_is_a_clear_error(tiny_store, data):
    key = data.draw(st.sampled_from(sorted(BAD_VALUES)), label="key")
    value = data.draw(BAD_VALUES[key], label="value")
    overrides = [
        "+experiment=pusht_lowdim",
        "+debug=fast",
        f"dataset.zarr_path={tiny_store}",
        "dataset.max_train_episodes=null",
        "logger.mode=disabled",
        _override(key, value),
    ]
    with (
        _no_hang(HANG_S),
        tempfile.TemporaryDirectory() as run_dir,
        pytest.raises(CLEAR_ERRORS) as err,
    ):
        Trainer(_compose(overrides), run_dir)
    msg = str(err.value)
    leaf = key.rsplit(".", 1)[-1]
    assert leaf in msg or str(value) in msg or repr(value) in msg, (key, value, msg)
