"""Is this file a usable GGUF model? Size, header, metadata and tensor layout, optional SHA-256.

One function, `verify_model_file`, used by the daemon before it loads a model and by
`qwen-edge model verify|pull|use`. It reads only the header and the tables (a fraction of a
second) unless a SHA-256 is asked for, which reads the whole file (seconds for 400 MB on a Pi).
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

GGUF_MAGIC: Final = b"GGUF"
SUPPORTED_VERSIONS: Final = (2, 3)
DEFAULT_ALIGNMENT: Final = 32

# Far above any real model, far below what a corrupt count would claim: a bound, so that a damaged
# header is reported instead of walked for minutes.
_MAX_TENSORS: Final = 1 << 20
_MAX_KV: Final = 1 << 20
_MAX_DIMS: Final = 4  # GGML_MAX_DIMS

# GGUF metadata value types -> fixed size in bytes (8 = string, 9 = array: variable).
_SCALAR_SIZE: Final = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING: Final = 8
_ARRAY: Final = 9

# ggml tensor types -> (elements per block, bytes per block), as llama.cpp's ggml defines them
# (tests/unit/test_modelfile.py checks this against the gguf package). A type missing here is one
# newer than this table: its tensors' sizes are not checked, the rest of the file still is.
GGML_BLOCKS: Final[dict[int, tuple[int, int]]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 40),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
    40: (64, 36),  # NVFP4
    41: (128, 18),  # Q1_0
}


class ModelError(Exception):
    """The model file cannot be used; the message says why in one line, starting with the path."""


@dataclass(frozen=True, slots=True)
class ModelFileInfo:
    path: Path
    size: int  # bytes
    version: int  # GGUF version
    tensors: int
    metadata: int  # key/value pairs
    architecture: str | None  # general.architecture
    sha256: str | None  # only when it was asked for


class _Damaged(Exception):
    """The header or tables run past the end of the file or hold impossible values."""


class _Reader:
    """Reads GGUF's little-endian header fields from a memory map, bounds-checked."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: mmap.mmap, end: int) -> None:
        self.buf = buf
        self.end = end
        self.pos = 0

    def _take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > self.end:
            raise _Damaged(f"a field at byte {start} runs past the end of the file")
        self.pos = start + n
        return start

    def u32(self) -> int:
        value: int = struct.unpack_from("<I", self.buf, self._take(4))[0]
        return value

    def u64(self) -> int:
        value: int = struct.unpack_from("<Q", self.buf, self._take(8))[0]
        return value

    def string(self) -> bytes:
        n = self.u64()
        start = self._take(n)
        return self.buf[start : start + n]

    def skip_string(self) -> None:
        self._take(self.u64())

    def skip_value(self, kind: int) -> None:
        if kind in _SCALAR_SIZE:
            self._take(_SCALAR_SIZE[kind])
        elif kind == _STRING:
            self.skip_string()
        elif kind == _ARRAY:
            item, count = self.u32(), self.u64()
            if item in _SCALAR_SIZE:
                self._take(_SCALAR_SIZE[item] * count)
            elif item == _STRING:
                for _ in range(count):  # a vocabulary: ~150,000 strings, a tenth of a second
                    self.skip_string()
            elif item == _ARRAY and count == 0:
                pass
            else:
                raise _Damaged(f"unsupported metadata array type {item}")
        else:
            raise _Damaged(f"unknown metadata type {kind}")


def _check_layout(buf: mmap.mmap, size: int) -> tuple[int, int, int, str | None]:
    """Walk the header, metadata and tensor table; -> (version, tensors, kv, architecture)."""
    r = _Reader(buf, size)
    r._take(4)  # noqa: SLF001  # magic, checked by the caller; same module as _Reader
    version = r.u32()
    if version not in SUPPORTED_VERSIONS:
        raise ModelError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = r.u64(), r.u64()
    if n_tensors == 0:
        raise ModelError("no tensors (a vocabulary-only GGUF?)")
    if n_tensors > _MAX_TENSORS:
        raise _Damaged(f"implausible tensor count {n_tensors}")
    if n_kv > _MAX_KV:
        raise _Damaged(f"implausible metadata count {n_kv}")
    alignment = DEFAULT_ALIGNMENT
    architecture = None
    for _ in range(n_kv):
        key = r.string()
        kind = r.u32()
        if key == b"general.alignment" and kind == 4:
            alignment = r.u32()
            if alignment == 0 or alignment & (alignment - 1):
                raise _Damaged(f"general.alignment {alignment} is not a power of two")
        elif key == b"general.architecture" and kind == _STRING:
            architecture = r.string().decode("utf-8", "replace")
        else:
            r.skip_value(kind)
    data_needed = 0
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.u32()
        if not 1 <= n_dims <= _MAX_DIMS:
            raise _Damaged(f"tensor {name!r} has {n_dims} dimensions")
        elements = 1
        for _ in range(n_dims):
            elements *= r.u64()
        ggml_type, offset = r.u32(), r.u64()
        if offset % alignment:
            raise _Damaged(f"tensor {name!r} is not aligned")
        block = GGML_BLOCKS.get(ggml_type)
        n_bytes = elements // block[0] * block[1] if block else 0
        data_needed = max(data_needed, offset + n_bytes)
    data_start = -(-r.pos // alignment) * alignment
    if data_start + data_needed > size:
        raise _Damaged(f"its tensors need {data_start + data_needed} bytes")
    return version, n_tensors, n_kv, architecture


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in chunks (hashlib releases the GIL while it hashes)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_kind(mode: int) -> str:
    """What `st_mode` says a directory entry is, for messages: "a regular file", "a FIFO", ..."""
    kinds = (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((name for test, name in kinds if test(mode)), "not a file")


def verify_model_file(
    path: Path, *, size: int | None = None, sha256: str | None = None
) -> ModelFileInfo:
    """Check that `path` is a complete GGUF model, of `size` bytes and hash `sha256` when given.

    Raises ModelError with one line that names the file and the fault.
    """
    try:
        # O_NONBLOCK: a FIFO at the path opens at once and is refused below, instead of waiting
        # for a writer forever; on a regular file it changes nothing.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ModelError(f"model file {path}: {exc.strerror or exc}") from None
    try:
        f = os.fdopen(fd, "rb")
    except OSError as exc:  # a directory: "Is a directory"
        os.close(fd)
        raise ModelError(f"model file {path}: {exc.strerror or exc}") from None
    with f:
        return verify_open_model(f, path, size=size, sha256=sha256)


def verify_open_model(
    f: io.BufferedIOBase, path: Path, *, size: int | None = None, sha256: str | None = None
) -> ModelFileInfo:
    """verify_model_file on a file already open (`path` only names it in messages).

    What is checked is what was opened, whatever the name has come to point at meanwhile: `model
    pull` verifies the very file it downloaded into before it renames it into place.
    """
    try:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ModelError(f"model file {path}: {file_kind(st.st_mode)}, not a regular file")
        actual = st.st_size
        if size is not None and actual != size:
            hint = " (an interrupted download?)" if actual < size else ""
            raise ModelError(f"model file {path}: {actual} bytes, expected {size}{hint}")
        f.seek(0)
        if f.read(4) != GGUF_MAGIC:
            raise ModelError(f"model file {path}: not a GGUF file (bad header)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                version, tensors, kv, arch = _check_layout(buf, actual)
            except _Damaged as exc:
                raise ModelError(
                    f"model file {path}: damaged or truncated GGUF ({actual} bytes; {exc})"
                ) from None
            except ModelError as exc:
                raise ModelError(f"model file {path}: {exc}") from None
        digest = None
        if sha256 is not None:
            f.seek(0)
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            if digest != sha256.lower():
                raise ModelError(
                    f"model file {path}: SHA-256 is {digest}, expected {sha256.lower()} "
                    "(corrupt, or a different file)"
                )
    except OSError as exc:
        raise ModelError(f"model file {path}: {exc.strerror or exc}") from None
    return ModelFileInfo(path, actual, version, tensors, kv, arch, digest)
