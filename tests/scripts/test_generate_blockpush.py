"""scripts/generate_blockpush.py: bad arguments get a one-line error, not a traceback."""

from __future__ import annotations

import pytest

from tests.helpers import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("generate_blockpush")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n-episodes", "0"], "--n-episodes=0 must be >= 1"),
        (["--exec-noise", "-0.01"], "-0.01"),
        (["--detour-prob", "1"], "--detour-prob=1.0 must be in [0, 1)"),
        (["--drift-prob", "-0.1"], "--drift-prob=-0.1 must be in [0, 1)"),
    ],
)
def test_bad_arguments_exit_2_and_write_nothing(script, tmp_path, capsys, args, message):
    dest = tmp_path / "store.zarr"
    assert script.main([*args, "--dest", str(dest), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not dest.exists()
