"""Finding the dataset store, and downloading the authors' Push-T archive when it is missing."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from diffusion_policy.data.errors import DatasetError, DatasetNotFoundError

log = logging.getLogger(__name__)

PUSHT_URL = "https://diffusion-policy.cs.columbia.edu/data/training/pusht.zip"
PUSHT_ENV = "PUSHT_ZARR"
PUSHT_STORE = "pusht_cchi_v7_replay.zarr"
# The store inside the archive, and the default place for it (relative to the repo root).
PUSHT_MEMBER = f"pusht/{PUSHT_STORE}"
DEFAULT_PUSHT_PATH = Path("data") / PUSHT_MEMBER


def resolve_dataset_path(path: str | os.PathLike[str]) -> Path:
    """Returns ``path`` as a Path if it exists.

    Raises:
        DatasetNotFoundError: If nothing is at ``path``.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetNotFoundError(
            f"dataset not found at {p}; put a local copy there or set dataset.zarr_path=..."
        )
    return p


def ensure_pusht(
    path: str | os.PathLike[str] = DEFAULT_PUSHT_PATH,
    download: bool = True,
    url: str | None = None,
) -> Path:
    """Returns the Push-T store, downloading the authors' archive if it is missing.

    Order: ``path`` if it exists; else the ``PUSHT_ZARR`` environment variable if it names an
    existing store; else (if ``download``) the archive from ``url`` is downloaded next to
    ``path``, checked and unpacked to ``path``.

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
    if env and Path(env).expanduser().exists():
        log.info("using the Push-T store from %s=%s", PUSHT_ENV, env)
        return Path(env).expanduser()
    hint = f"put a local copy at {path} or set dataset.zarr_path=... / {PUSHT_ENV}=..."
    if env:
        hint += f" ({PUSHT_ENV}={env} does not exist either)"
    if not download:
        raise DatasetNotFoundError(f"Push-T dataset missing at {path} (download disabled); {hint}")
    url = url or PUSHT_URL
    path.parent.mkdir(parents=True, exist_ok=True)
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
    """Returns the store at ``path``; downloads it only if it is the Push-T store.

    Args:
        path: The configured store path.
        download: Whether a missing Push-T store may be downloaded (see :func:`ensure_pusht`).
    """
    if Path(path).name == PUSHT_STORE:
        return ensure_pusht(path, download=download)
    return resolve_dataset_path(path)


def download_file(url: str, dest: Path, chunk_size: int = 1 << 20) -> Path:
    """Streams ``url`` to ``dest`` with a progress bar, via ``dest.part`` and a rename."""
    part = dest.with_name(dest.name + ".part")
    log.info("downloading %s to %s", url, dest)
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                while chunk := response.read(chunk_size):
                    out.write(chunk)
                    bar.update(len(chunk))
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
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
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.unpack-", dir=dest.parent))
            try:
                zf.extractall(tmp, members=names)
                os.replace(tmp / member, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except zipfile.BadZipFile as e:
        raise DatasetError(f"archive {archive} is not a valid zip file ({e})") from e
    log.info("unpacked %s to %s", member, dest)
    return dest
