"""Dataset download: the offline error, and the zip check + unpack via a file:// URL."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import numpy as np
import pytest

from diffusion_policy.data import download
from diffusion_policy.data.errors import DatasetError, DatasetNotFoundError
from diffusion_policy.data.replay_buffer import ReplayBuffer

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(download.PUSHT_ENV, raising=False)


@pytest.fixture
def pusht_zip(tmp_path, make_replay_buffer) -> tuple[Path, ReplayBuffer]:
    """A small pusht.zip laid out like the authors' archive."""
    rb = make_replay_buffer((4, 6))
    src = tmp_path / "src"
    rb.save(src / download.PUSHT_MEMBER)
    archive = tmp_path / "pusht.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(src.rglob("*")):
            zf.write(f, f.relative_to(src).as_posix())
    return archive, rb


def test_offline_error_names_path_reason_and_fixes(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "PUSHT_URL", "http://127.0.0.1:9/pusht.zip")
    dest = tmp_path / "data" / download.PUSHT_MEMBER
    with pytest.raises(DatasetNotFoundError) as e:
        download.ensure_pusht(dest)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"missing at {dest}" in msg and "download from http://127.0.0.1:9" in msg
    assert "refused" in msg.lower()
    assert "dataset.zarr_path=" in msg and "PUSHT_ZARR=" in msg
    assert not any(dest.parent.iterdir())  # no .part or zip left behind
    with pytest.raises(DatasetNotFoundError, match="download disabled"):
        download.ensure_pusht(dest, download=False)


def test_existing_path_and_env_var(tmp_path, monkeypatch):
    store = tmp_path / "mine.zarr"
    store.mkdir()
    assert download.ensure_pusht(store) == store
    assert download.ensure_dataset(store) == store
    monkeypatch.setenv(download.PUSHT_ENV, str(store))
    # Only the default location (unset dataset.zarr_path) may fall back to $PUSHT_ZARR.
    monkeypatch.chdir(tmp_path / "mine.zarr")
    assert download.ensure_dataset(download.DEFAULT_PUSHT_PATH, download=False) == store
    assert download.ensure_pusht(download.DEFAULT_PUSHT_PATH, download=False) == store
    with pytest.raises(DatasetNotFoundError, match="other.zarr"):
        download.ensure_dataset(tmp_path / "other.zarr")  # not Push-T: never downloads


def test_mistyped_explicit_path_does_not_fall_back_to_env(tmp_path, monkeypatch):
    store = tmp_path / "real" / download.PUSHT_STORE
    store.mkdir(parents=True)
    monkeypatch.setenv(download.PUSHT_ENV, str(store))
    typo = tmp_path / "reel" / download.PUSHT_STORE
    with pytest.raises(DatasetNotFoundError) as err:
        download.ensure_dataset(typo)  # before: silently returned $PUSHT_ZARR's store
    msg = str(err.value)
    assert f"dataset.zarr_path='{typo}': no store at {typo}" in msg
    assert f"PUSHT_ZARR={store} is not used" in msg and "download_pusht.py --dest" in msg
    with pytest.raises(DatasetNotFoundError, match="not used in place of a path given"):
        download.ensure_pusht(typo, download=False)
    assert not typo.parent.exists()  # nothing downloaded or created


def test_download_unpacks_file_url(tmp_path, monkeypatch, pusht_zip):
    archive, rb = pusht_zip
    monkeypatch.setattr(download, "PUSHT_URL", archive.as_uri())
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    dest = tmp_path / "out" / download.DEFAULT_PUSHT_PATH  # the default location
    assert download.ensure_dataset(download.DEFAULT_PUSHT_PATH) == download.DEFAULT_PUSHT_PATH
    got = ReplayBuffer.open(dest)
    np.testing.assert_array_equal(got.episode_ends, rb.episode_ends)
    np.testing.assert_array_equal(got["keypoint"], rb["keypoint"])
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # zip and temp removed


def test_script_downloads_to_dest(tmp_path, pusht_zip):
    spec = importlib.util.spec_from_file_location("dl", REPO_ROOT / "scripts/download_pusht.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    dest = tmp_path / "elsewhere.zarr"
    assert script.main(["--dest", str(dest), "--url", pusht_zip[0].as_uri()]) == 0
    assert ReplayBuffer.open(dest).n_episodes == 2


def test_bad_archives(tmp_path):
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="not a valid zip"):
        download.extract_store(junk, download.PUSHT_MEMBER, tmp_path / "x.zarr")
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("something/else.txt", "hi")
    with pytest.raises(DatasetError, match="does not contain pusht/pusht_cchi_v7_replay.zarr/"):
        download.extract_store(other, download.PUSHT_MEMBER, tmp_path / "x.zarr")
    assert not (tmp_path / "x.zarr").exists()


def test_corrupt_member_is_detected(tmp_path, pusht_zip):
    archive, _ = pusht_zip
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(broken, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), zipfile.ZIP_STORED)
    raw = bytearray(broken.read_bytes())
    pos = raw.index(b"zarr_format") + 3  # inside a stored (uncompressed) .zarray member
    raw[pos] ^= 0xFF
    broken.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="is corrupt: bad CRC in pusht/"):
        download.extract_store(broken, download.PUSHT_MEMBER, tmp_path / "y.zarr")
