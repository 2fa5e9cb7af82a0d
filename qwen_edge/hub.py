"""Download a catalog model from the Hugging Face Hub: resumable, verified, renamed into place.

huggingface_hub does the HTTP: the metadata request (commit, size, the LFS SHA-256), the GET with
`Range` to resume, retries, the token (HF_TOKEN), the endpoint (HF_ENDPOINT) and offline mode
(HF_HUB_OFFLINE). What it does not do, this does: keep the partial file between runs
(`<file>.partial` beside the target, so an interrupted pull resumes where it stopped), check size,
GGUF layout and SHA-256 before the file gets its name, and rename it into place atomically, so the
daemon never sees half a model.
"""

from __future__ import annotations

import fcntl
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2
import huggingface_hub
from huggingface_hub import constants, get_hf_file_metadata, get_token, hf_hub_url
from huggingface_hub.errors import (
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from tqdm import tqdm

from .catalog import CatalogModel
from .modelfile import ModelError, ModelFileInfo, verify_model_file

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
    target = models_dir / model.file
    if target.exists():
        try:
            info = verify_model_file(target, size=model.size, sha256=model.sha256)
        except ModelError as exc:
            say(f"{exc}; downloading it again")
        else:
            return Pulled(target, info.size, model.sha256, downloaded=False, resumed_from=0)
    if offline():
        raise PullError(
            f"{model.name} is not in {models_dir} and HF_HUB_OFFLINE is set: copy "
            f"{model.file} there by hand (then `qwen-edge model verify {model.name}`) "
            "or unset HF_HUB_OFFLINE"
        )
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PullError(f"models directory {models_dir}: {exc.strerror or exc}") from None

    url = hf_hub_url(model.repo, model.file, revision=model.revision)
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

    # The Hub's ETag of an LFS file is the file's SHA-256.
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
    expected_sha = model.sha256 or hub_sha
    size = model.size or meta.size

    headers = {}
    location = meta.location
    token = get_token()  # HF_TOKEN, or the one `hf auth login` stored
    if token and urlsplit(location).netloc == urlsplit(url).netloc:
        headers["authorization"] = f"Bearer {token}"  # a CDN's signed URL gets no token

    partial = partial_path(target)
    try:
        resumed, info = _download(
            model,
            location,
            partial,
            target,
            headers=headers,
            size=size,
            expected_sha=expected_sha,
            progress=progress,
            say=say,
        )
    except OSError as exc:  # writing the partial file or renaming it
        raise PullError(f"{partial}: {exc.strerror or exc}") from None
    _fsync_dir(models_dir)
    return Pulled(target, info.size, expected_sha, downloaded=True, resumed_from=resumed)


def _download(
    model: CatalogModel,
    location: str,
    partial: Path,
    target: Path,
    *,
    headers: dict[str, str],
    size: int | None,
    expected_sha: str | None,
    progress: bool,
    say: Callable[[str], None],
) -> tuple[int, ModelFileInfo]:
    """GET into `partial` from where an earlier pull stopped, verify, rename to `target`."""
    with partial.open("ab") as out:
        try:
            fcntl.flock(out.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PullError(f"another pull is writing {partial}") from None
        resumed = out.tell()
        if size is not None and resumed > size:
            out.truncate(0)
            resumed = 0
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
            info = verify_model_file(partial, size=size, sha256=expected_sha)
        except ModelError as exc:
            partial.unlink(missing_ok=True)
            raise PullError(f"{exc}; the download was deleted") from None
        os.replace(partial, target)
    return resumed, info


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
