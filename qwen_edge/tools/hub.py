"""Download a catalog model from the Hugging Face Hub: resumable, verified, renamed into place.

huggingface_hub does the HTTP: the metadata request (commit, size, the LFS SHA-256), the GET with
`Range` to resume, retries, the token (HF_TOKEN), the endpoint (HF_ENDPOINT) and offline mode
(HF_HUB_OFFLINE). What it does not do, this does: keep the partial file between runs
(`<file>.partial` beside the target, so an interrupted pull resumes where it stopped), check size,
GGUF layout and SHA-256 before the file gets its name, and rename it into place atomically, so the
daemon never sees half a model.

The models directory belongs to the service account (the systemd unit's state directory), and the
pull is run as root: whatever the daemon, or whoever took it over, puts in that directory must not
turn root's writes elsewhere. So the directory is opened once, without following a link, and every
name in it is opened, renamed and removed relative to that descriptor: never through a symbolic
link, only if it is a regular file (and, for the file written to, one with no other name), and
verified from the descriptor that was written, not by its name again.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import re
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2
import huggingface_hub
from huggingface_hub import HfFileMetadata, constants, get_hf_file_metadata, get_token, hf_hub_url
from huggingface_hub.errors import (
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from tqdm import tqdm

from ..node.modelfile import ModelError, ModelFileInfo, file_kind, verify_open_model
from .catalog import CatalogModel

_SHA256 = re.compile(r"[0-9a-f]{64}")
PARTIAL_SUFFIX = ".partial"


class PullError(Exception):
    """The model could not be downloaded or did not verify; the message is one line."""


@dataclass(frozen=True, slots=True)
class Pulled:
    path: Path
    size: int
    sha256: str | None  # what the file was checked against (None: the Hub published no SHA-256)
    downloaded: bool  # False: it was already there and verified
    resumed_from: int  # bytes already on disk from an earlier, interrupted pull


class _Progress(tqdm):  # type: ignore[type-arg]
    """tqdm on stderr; on a terminal it redraws, in a log it writes a line every 10 s."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        tty = sys.stderr.isatty()
        kwargs.pop("name", None)
        kwargs.setdefault("mininterval", 0.2 if tty else 10.0)
        kwargs.setdefault("file", sys.stderr)
        kwargs.setdefault("ascii", not tty)
        kwargs["disable"] = not self.shown
        super().__init__(*args, **kwargs)

    shown = True


class _Silent(_Progress):
    shown = False


def partial_path(target: Path) -> Path:
    return target.with_name(target.name + PARTIAL_SUFFIX)


def offline() -> bool:
    return bool(huggingface_hub.is_offline_mode())


def pull(
    model: CatalogModel,
    models_dir: Path,
    *,
    progress: bool = True,
    say: Callable[[str], None] = lambda _line: None,
) -> Pulled:
    """Put `model` into `models_dir`, downloading only what is missing or wrong."""
    dir_fd = _open_models_dir(models_dir)
    try:
        return _pull_into(model, models_dir, dir_fd, progress=progress, say=say)
    finally:
        os.close(dir_fd)


def _pull_into(
    model: CatalogModel,
    models_dir: Path,
    dir_fd: int,
    *,
    progress: bool,
    say: Callable[[str], None],
) -> Pulled:
    target = models_dir / model.file
    kept = _already_there(model, target, dir_fd, say)
    if kept is not None:
        return kept
    if offline():
        raise PullError(
            f"{model.name} is not in {models_dir} and HF_HUB_OFFLINE is set: copy "
            f"{model.file} there by hand (then `qwen-edge model verify {model.name}`) "
            "or unset HF_HUB_OFFLINE"
        )
    url = hf_hub_url(model.repo, model.file, revision=model.revision)
    meta = _checked_metadata(model, url)
    # The Hub's ETag of an LFS file is the file's SHA-256.
    hub_sha = meta.etag if meta.etag and _SHA256.fullmatch(meta.etag) else None
    expected_sha = model.sha256 or hub_sha
    headers = {}
    location = meta.location
    token = get_token()  # HF_TOKEN, or the one `hf auth login` stored
    if token and urlsplit(location).netloc == urlsplit(url).netloc:
        headers["authorization"] = f"Bearer {token}"  # a CDN's signed URL gets no token

    partial = partial_path(target)
    try:
        # Not O_EXCL: an existing partial file is what the pull resumes from.
        fd = _open_entry(dir_fd, partial, os.O_RDWR | os.O_CREAT, single_name=True)
        out = os.fdopen(fd, "r+b")
    except OSError as exc:
        raise PullError(f"{partial}: {exc.strerror or exc}") from None
    with out:
        try:
            resumed, info = _download(
                model,
                location,
                out,
                partial=partial,
                target=target,
                dir_fd=dir_fd,
                headers=headers,
                size=model.size or meta.size,
                expected_sha=expected_sha,
                progress=progress,
                say=say,
            )
            os.fsync(dir_fd)
        except OSError as exc:  # writing the partial file or renaming it
            raise PullError(f"{partial}: {exc.strerror or exc}") from None
    return Pulled(target, info.size, expected_sha, downloaded=True, resumed_from=resumed)


def _already_there(
    model: CatalogModel, target: Path, dir_fd: int, say: Callable[[str], None]
) -> Pulled | None:
    """The model when a verified copy is in place already (opened without following links)."""
    try:
        present = os.fdopen(_open_entry(dir_fd, target, os.O_RDONLY), "rb")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PullError(f"{target}: {exc.strerror or exc}") from None
    with present:
        try:
            info = verify_open_model(present, target, size=model.size, sha256=model.sha256)
        except ModelError as exc:
            say(f"{exc}; downloading it again")
            return None
    return Pulled(target, info.size, model.sha256, downloaded=False, resumed_from=0)


def _checked_metadata(model: CatalogModel, url: str) -> HfFileMetadata:
    """The Hub's metadata of the file, refused when it contradicts the catalog."""
    try:
        meta = get_hf_file_metadata(url, retry_on_errors=True)
    except (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError) as exc:
        raise PullError(
            f"{model.repo}@{model.revision}/{model.file} not found on {constants.ENDPOINT} "
            f"({type(exc).__name__}; a private or gated repository needs HF_TOKEN)"
        ) from None
    except OfflineModeIsEnabled:
        raise PullError("HF_HUB_OFFLINE is set: no downloads") from None
    except (HfHubHTTPError, OSError, httpx2.HTTPError) as exc:
        raise PullError(f"cannot reach {constants.ENDPOINT}: {_one_line(exc)}") from None
    hub_sha = meta.etag if meta.etag and _SHA256.fullmatch(meta.etag) else None
    if model.sha256 and hub_sha and hub_sha != model.sha256:
        raise PullError(
            f"{model.repo}@{model.revision}/{model.file} on {constants.ENDPOINT} has SHA-256 "
            f"{hub_sha}, the catalog expects {model.sha256}: refusing to download it"
        )
    if model.size and meta.size and meta.size != model.size:
        raise PullError(
            f"{model.repo}@{model.revision}/{model.file} on {constants.ENDPOINT} is "
            f"{meta.size} bytes, the catalog expects {model.size}: refusing to download it"
        )
    return meta


def _open_models_dir(models_dir: Path) -> int:
    """The models directory as a descriptor, created if missing; never through a link.

    Its parent (the state directory's, or the admin's) is trusted; the directory itself may be
    swapped for a link by the account that owns the parent, so a link there is refused.
    """
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        return os.open(models_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        # With O_DIRECTORY, Linux says ENOTDIR for a link (ELOOP without it).
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and models_dir.is_symlink():
            raise PullError(
                f"models directory {models_dir} is a symbolic link: set model.dir to the "
                "directory itself"
            ) from None
        raise PullError(f"models directory {models_dir}: {exc.strerror or exc}") from None


def _open_entry(dir_fd: int, path: Path, flags: int, *, single_name: bool = False) -> int:
    """A descriptor of `path`'s name in `dir_fd`, if it is (or becomes) a regular file.

    O_NOFOLLOW: a symbolic link is not followed but refused. O_NONBLOCK: a FIFO opens at once and
    is refused, instead of blocking until someone writes to it (on a regular file it changes
    nothing). `single_name`, for a file about to be written: a hard link would have the write land
    in a file of another name, maybe outside the directory. Raises PullError for what is not a
    plain file, OSError for anything else (FileNotFoundError: nothing there).
    """
    name = path.name
    try:
        fd = os.open(
            name,
            flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
            0o644,
            dir_fd=dir_fd,
        )
    except OSError as exc:
        # ELOOP: a symbolic link; EISDIR: a directory; ENXIO: a socket, or a FIFO opened
        # write-only. Say which, from the entry itself.
        if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise
        try:
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
        except OSError:
            raise exc from None
        if stat.S_ISREG(mode):
            raise
        raise _refused(path, f"is {file_kind(mode)}, not a regular file") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _refused(path, f"is {file_kind(st.st_mode)}, not a regular file")
    if single_name and st.st_nlink != 1:
        os.close(fd)
        raise _refused(path, f"has {st.st_nlink} names (hard links)")
    return fd


def _refused(path: Path, why: str) -> PullError:
    return PullError(f"{path} {why}: refusing to use it (remove it, then run the pull again)")


def _download(
    model: CatalogModel,
    location: str,
    out: io.BufferedRandom,
    *,
    partial: Path,
    target: Path,
    dir_fd: int,
    headers: dict[str, str],
    size: int | None,
    expected_sha: str | None,
    progress: bool,
    say: Callable[[str], None],
) -> tuple[int, ModelFileInfo]:
    """GET into `out` (`partial`) from where an earlier pull stopped, verify, rename to `target`."""
    try:
        fcntl.flock(out.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise PullError(f"another pull is writing {partial}") from None
    resumed = out.seek(0, os.SEEK_END)
    if size is not None and resumed > size:
        out.truncate(0)
        resumed = out.seek(0)
    if resumed:
        say(f"resuming {model.file} at {resumed} bytes")
    try:
        http_get(
            location,
            out,
            resume_size=resumed,
            headers=headers,
            expected_size=size,
            displayed_filename=model.file,
            tqdm_class=_Progress if progress else _Silent,
        )
        out.flush()
        os.fsync(out.fileno())
    except (HfHubHTTPError, OSError, httpx2.HTTPError) as exc:
        # What arrived stays in the .partial file: the next pull resumes from there.
        raise PullError(
            f"download of {model.file} failed: {_one_line(exc)}; run the pull again to resume"
        ) from None
    try:
        info = verify_open_model(out, partial, size=size, sha256=expected_sha)
    except ModelError as exc:
        os.unlink(partial.name, dir_fd=dir_fd)
        raise PullError(f"{exc}; the download was deleted") from None
    # rename(2) replaces the entry `target` names, a link included, never what a link points at.
    os.replace(partial.name, target.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    placed = os.stat(target.name, dir_fd=dir_fd, follow_symlinks=False)
    written = os.fstat(out.fileno())
    if (placed.st_dev, placed.st_ino) != (written.st_dev, written.st_ino):
        # Someone swapped the partial file between the check and the rename: what now bears the
        # model's name is not what was verified.
        raise PullError(
            f"{partial} was replaced while it was being put in place: {target} is not the "
            "verified download; remove it and run the pull again"
        )
    return resumed, info


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
