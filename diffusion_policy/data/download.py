"""Finding the dataset store, and downloading the authors' Push-T archive when it is missing."""

from __future__ import annotations

import logging
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from diffusion_policy.data.errors import DatasetError, DatasetNotFoundError
from diffusion_policy.utils.atomic import atomic_write, atomic_write_dir

log = logging.getLogger(__name__)

PUSHT_URL = "https://diffusion-policy.cs.columbia.edu/data/training/pusht.zip"
PUSHT_ENV = "PUSHT_ZARR"
PUSHT_STORE = "pusht_cchi_v7_replay.zarr"
# The store inside the archive, and the default place for it (relative to the repo root).
PUSHT_MEMBER = f"pusht/{PUSHT_STORE}"
DEFAULT_PUSHT_PATH = Path("data") / PUSHT_MEMBER


def is_default_pusht_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is the default store location ``data/pusht/...`` (of the working dir)."""
    p = Path(path).expanduser()
    return p == DEFAULT_PUSHT_PATH or p.absolute() == DEFAULT_PUSHT_PATH.absolute()


def ensure_pusht(
    path: str | os.PathLike[str] = DEFAULT_PUSHT_PATH,
    download: bool = True,
    url: str | None = None,
) -> Path:
    """Returns the Push-T store, downloading the authors' archive if it is missing.

    Order: ``path`` if it exists; else, only when ``path`` is the default location, the
    ``PUSHT_ZARR`` environment variable if it names an existing store; else (if ``download``)
    the archive from ``url`` is downloaded next to ``path``, checked and unpacked to ``path``.
    An explicit ``path`` is never replaced by another store.

    Args:
        path: Where the store is, or is to be put.
        download: Whether to download when the store is missing.
        url: Archive URL; ``PUSHT_URL`` if None.

    Returns:
        The path of an existing store.

    Raises:
        DatasetNotFoundError: If the store is missing and could not be downloaded.
        DatasetError: If the downloaded archive is corrupt or lacks the store.
    """
    path = Path(path).expanduser()
    if path.exists():
        return path
    env = os.environ.get(PUSHT_ENV)
    default = is_default_pusht_path(path)
    if default and env and Path(env).expanduser().exists():
        log.info("using the Push-T store from %s=%s", PUSHT_ENV, env)
        return Path(env).expanduser()
    hint = f"put a local copy at {path} or set dataset.zarr_path=... / {PUSHT_ENV}=..."
    if env and default:
        hint += f" ({PUSHT_ENV}={env} does not exist either)"
    elif env:
        hint += f" ({PUSHT_ENV}={env} is not used in place of a path given explicitly)"
    if not download:
        raise DatasetNotFoundError(f"Push-T dataset missing at {path} (download disabled); {hint}")
    url = url or PUSHT_URL
    archive = path.parent / "pusht.zip"
    try:
        download_file(url, archive)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise DatasetNotFoundError(
            f"Push-T dataset missing at {path}; download from {url} failed ({reason}); {hint}"
        ) from e
    try:
        extract_store(archive, PUSHT_MEMBER, path)
    finally:
        archive.unlink(missing_ok=True)
    return path


def ensure_dataset(path: str | os.PathLike[str], download: bool = True) -> Path:
    """Returns the store at ``path``; only the default Push-T location may fall back or download.

    A ``dataset.zarr_path`` set by the user (or by ``PUSHT_ZARR`` through the config) that does
    not exist is an error: a typo must not silently train on another store.

    Args:
        path: The configured store path.
        download: Whether the store at the default location may be downloaded when missing
            (see :func:`ensure_pusht`).

    Raises:
        DatasetNotFoundError: If ``path`` does not exist (and is not the default location, or
            the download failed).
    """
    if Path(path).expanduser().exists():
        return Path(path).expanduser()
    if is_default_pusht_path(path):
        return ensure_pusht(path, download=download)
    p = Path(path).expanduser()
    msg = f"dataset.zarr_path={str(path)!r}: no store at {p.absolute()}"
    if Path(path).name == PUSHT_STORE:
        msg += f"; to download Push-T there: python scripts/download_pusht.py --dest {p}"
    env = os.environ.get(PUSHT_ENV)
    if env and Path(env).expanduser() != p:
        msg += f" ({PUSHT_ENV}={env} is not used in place of a path given explicitly)"
    raise DatasetNotFoundError(msg)


def download_file(url: str, dest: Path, chunk_size: int = 1 << 20) -> Path:
    """Streams ``url`` to ``dest`` with a progress bar, atomically (complete or absent)."""
    log.info("downloading %s to %s", url, dest)

    def stream(out: Any) -> None:
        with urllib.request.urlopen(url, timeout=30) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                while chunk := response.read(chunk_size):
                    out.write(chunk)
                    bar.update(len(chunk))

    atomic_write(dest, stream)
    return dest


def extract_store(archive: Path, member: str, dest: Path) -> Path:
    """Checks a zip archive and unpacks its folder ``member`` to ``dest``.

    Raises:
        DatasetError: If the archive is corrupt, lacks ``member``, or has unsafe paths.
    """
    try:
        with zipfile.ZipFile(archive) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise DatasetError(f"archive {archive} is corrupt: bad CRC in {bad}")
            names = [n for n in zf.namelist() if n.startswith(member.rstrip("/") + "/")]
            if not names:
                raise DatasetError(f"archive {archive} does not contain {member}/")
            for name in names:
                if name.startswith("/") or ".." in Path(name).parts:
                    raise DatasetError(f"archive {archive} has an unsafe path {name!r}")
            # Unpack beside dest and move into place, so dest is complete or absent.
            prefix = member.rstrip("/") + "/"
            atomic_write_dir(dest, lambda tmp: _unpack(zf, names, prefix, tmp))
    except zipfile.BadZipFile as e:
        raise DatasetError(f"archive {archive} is not a valid zip file ({e})") from None
    log.info("unpacked %s to %s", member, dest)
    return dest


def _unpack(zf: zipfile.ZipFile, names: list[str], prefix: str, folder: Path) -> None:
    """Writes the archive members ``names`` (all under ``prefix``) into ``folder``."""
    for name in names:
        target = folder / name[len(prefix) :]
        if name.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(name) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
