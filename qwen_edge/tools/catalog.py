"""The models `qwen-edge model` knows: where each comes from, its size and SHA-256.

Built-in: Qwen2.5-0.5B-Instruct from Qwen's own GGUF repository, pinned to one commit. More entries
(a mirror, another quantisation, a private model) come from a TOML file named by the setting
`model.catalog`, with the same fields:

    [[models]]
    name = "my-model-q4_0"          # what `qwen-edge model pull|use` take
    repo = "me/My-Model-GGUF"       # Hugging Face repository
    file = "my-model-q4_0.gguf"
    revision = "main"               # a branch, tag or commit
    quant = "Q4_0"
    size = 123456789                # bytes (optional)
    sha256 = "..."                  # optional; see below
    description = "..."

An entry without `sha256` is checked after download against the SHA-256 the Hub publishes for the
file (its Git LFS object id, sent as the X-Linked-Etag header); one with it is checked against both.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

QWEN_REPO = "Qwen/Qwen2.5-0.5B-Instruct-GGUF"
# The commit of Qwen/Qwen2.5-0.5B-Instruct-GGUF the sizes and hashes below belong to.
QWEN_REVISION = "9217f5db79a29953eb74d5343926648285ec7e67"


class CatalogError(Exception):
    """An unknown model name or an unreadable catalog file; the message is one line."""


class CatalogModel(BaseModel):
    """One downloadable GGUF file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    repo: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
    file: str = Field(pattern=r"^[^/\\]+\.gguf$")
    revision: str = "main"
    quant: str = ""
    size: int | None = Field(None, gt=0)
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    description: str = ""


BUILTIN: tuple[CatalogModel, ...] = (
    CatalogModel(
        name="qwen2.5-0.5b-instruct-q4_k_m",
        repo=QWEN_REPO,
        file="qwen2.5-0.5b-instruct-q4_k_m.gguf",
        revision=QWEN_REVISION,
        quant="Q4_K_M",
        size=491_400_032,
        sha256="74a4da8c9fdbcd15bd1f6d01d621410d31c6fc00986f5eb687824e7b93d7a9db",
        description="Qwen2.5-0.5B-Instruct, 4-bit k-quant (the default)",
    ),
    CatalogModel(
        name="qwen2.5-0.5b-instruct-q4_0",
        repo=QWEN_REPO,
        file="qwen2.5-0.5b-instruct-q4_0.gguf",
        revision=QWEN_REVISION,
        quant="Q4_0",
        # Size and SHA-256 not recorded here: taken from the Hub's LFS metadata at download time.
        description="Qwen2.5-0.5B-Instruct, 4-bit legacy quant (repacked fast kernels on ARM/x86)",
    ),
    CatalogModel(
        name="qwen2.5-0.5b-instruct-q8_0",
        repo=QWEN_REPO,
        file="qwen2.5-0.5b-instruct-q8_0.gguf",
        revision=QWEN_REVISION,
        quant="Q8_0",
        size=675_710_816,
        sha256="ca59ca7f13d0e15a8cfa77bd17e65d24f6844b554a7b6c12e07a5f89ff76844e",
        description="Qwen2.5-0.5B-Instruct, 8-bit",
    ),
)


class _CatalogFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[CatalogModel] = []


def load_catalog(extra: Path | None = None) -> list[CatalogModel]:
    """The built-in models, then those of `extra`; an entry there replaces a built-in namesake."""
    models = {m.name: m for m in BUILTIN}
    if extra is not None:
        try:
            data = tomllib.loads(extra.read_text(encoding="utf-8"))
            for model in _CatalogFile.model_validate(data).models:
                models[model.name] = model
        except OSError as exc:
            raise CatalogError(f"catalog {extra}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise CatalogError(f"catalog {extra}: {exc}") from None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise CatalogError(f"catalog {extra}: {where}: {first['msg']}") from None
    return list(models.values())


def find(models: list[CatalogModel], name: str) -> CatalogModel:
    """The entry called `name` (or whose file is `name`), case-insensitively."""
    wanted = name.lower()
    for model in models:
        if wanted in (model.name.lower(), model.file.lower()):
            return model
    known = ", ".join(m.name for m in models)
    raise CatalogError(f"unknown model {name!r}; known: {known}")
