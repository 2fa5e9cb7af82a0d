"""`qwen-edge model list|pull|verify|use`: the node's model files, from the catalog to the config.

Models live in `model.dir` (default /var/lib/qwen-edge/models, the systemd unit's state
directory); `model.path` names the one the daemon serves, and `use` rewrites it in the TOML file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.items import Table

from ..node.modelfile import ModelError, ModelFileInfo, file_sha256, verify_model_file
from ..settings import DEFAULT_CONFIG_FILE, ConfigError, Settings, load_settings
from .catalog import CatalogError, CatalogModel, find, load_catalog
from .hub import PullError, partial_path, pull

EXIT_FAILED = 1
EXIT_MODEL = 3  # as the daemon's: the model file is unusable


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """The `model` command and its subcommands, for cli.py; `parents`: the options every
    command has (--config)."""
    model = sub.add_parser(
        "model", parents=parents, help="list, download, verify and select model files"
    )
    verbs = model.add_subparsers(dest="model_command", required=True)

    ls = verbs.add_parser("list", help="the known models and which are in model.dir")
    ls.add_argument("--json", action="store_true", help="print JSON instead of text")

    get = verbs.add_parser("pull", help="download a model from the Hugging Face Hub")
    get.add_argument("name", help="a model name from `qwen-edge model list`")
    get.add_argument("--quiet", action="store_true", help="no progress bar")

    check = verbs.add_parser("verify", help="check a model file: size, GGUF layout, SHA-256")
    check.add_argument(
        "model", nargs="?", help="model name or file (default: the configured model.path)"
    )
    check.add_argument(
        "--sha256", type=_sha256_arg, help="expected SHA-256 (default: the catalog's, if known)"
    )

    use = verbs.add_parser("use", help="point model.path in the config file at a model")
    use.add_argument("model", help="model name (in model.dir) or path of a GGUF file")
    use.add_argument(
        "--installed-as",
        type=Path,
        metavar="PATH",
        help="write PATH, where the checked file will be on the device, instead of its own path "
        "(scripts/install stages a root before the file is in place)",
    )


def _sha256_arg(value: str) -> str:
    if len(value) != 64 or any(c not in "0123456789abcdefABCDEF" for c in value):
        raise argparse.ArgumentTypeError("must be 64 hexadecimal digits")
    return value.lower()


def run_model(settings: Settings, args: argparse.Namespace) -> int:
    try:
        catalog = load_catalog(settings.model.catalog)
        if args.model_command == "list":
            return _list(settings, catalog, as_json=args.json)
        if args.model_command == "pull":
            return _pull(settings, catalog, args.name, quiet=args.quiet)
        if args.model_command == "verify":
            return _verify(settings, catalog, args.model, args.sha256)
        return _use(settings, catalog, args.model, args.config, args.installed_as)
    except (CatalogError, PullError, ConfigError) as exc:
        _fail(str(exc))
        return EXIT_FAILED
    except ModelError as exc:
        _fail(str(exc))
        return EXIT_MODEL


def _fail(message: str) -> None:
    print(f"qwen-edge: {message}", file=sys.stderr)


def _mb(size: int | None) -> str:
    return f"{size / 1e6:.1f} MB" if size is not None else "size unknown"


def _presence(settings: Settings, model: CatalogModel) -> str:
    """yes | no | partial N% | wrong size: what a glance at model.dir says, without hashing."""
    target = settings.model.dir / model.file
    try:
        size = target.stat().st_size
    except OSError:
        try:
            got = partial_path(target).stat().st_size
        except OSError:
            return "no"
        return f"partial {100 * got // model.size}%" if model.size else "partial"
    return "wrong size" if model.size is not None and size != model.size else "yes"


def _list(settings: Settings, catalog: list[CatalogModel], *, as_json: bool) -> int:
    serving = settings.model.path.absolute()
    rows = []
    for model in catalog:
        path = settings.model.dir / model.file
        rows.append(
            {
                **model.model_dump(),
                "path": str(path),
                "present": _presence(settings, model),
                "configured": path.absolute() == serving,
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"models in {settings.model.dir} (* = model.path):")
    for row in rows:
        mark = "*" if row["configured"] else " "
        size = _mb(row["size"])
        print(f"{mark} {row['name']:<34} {row['quant']:<7} {size:>12}  {row['present']}")
        print(f"    source  {row['repo']}@{row['revision']}/{row['file']}")
        print(f"    sha256  {row['sha256'] or '(from the Hub at download)'}")
    if not any(row["configured"] for row in rows):
        print(f"  model.path = {settings.model.path} (not from this list)")
    return 0


def _pull(settings: Settings, catalog: list[CatalogModel], name: str, *, quiet: bool) -> int:
    model = find(catalog, name)
    result = pull(model, settings.model.dir, progress=not quiet, say=_fail)
    checked = f"SHA-256 {result.sha256} verified" if result.sha256 else "no SHA-256 known"
    if result.downloaded:
        resumed = f", resumed at {_mb(result.resumed_from)}" if result.resumed_from else ""
        print(f"{model.name}: downloaded {_mb(result.size)}{resumed} to {result.path}, {checked}")
    else:
        print(f"{model.name}: already in {result.path}, {checked}")
    if result.path.absolute() != settings.model.path.absolute():
        print(f"serve it with: qwen-edge model use {model.name}")
    return 0


def _resolve(
    settings: Settings, catalog: list[CatalogModel], what: str | None
) -> tuple[Path, CatalogModel | None]:
    """A model name or a path -> (file, its catalog entry if it is one)."""
    if what is None:
        path = settings.model.path
    else:
        try:
            model = find(catalog, what)
        except CatalogError:
            path = Path(what)
            if not path.exists() and "/" not in what and not what.endswith(".gguf"):
                raise
        else:
            return settings.model.dir / model.file, model
    by_file = [m for m in catalog if m.file == path.name]
    return path, by_file[0] if by_file else None


def _check(path: Path, model: CatalogModel | None, sha256: str | None) -> tuple[ModelFileInfo, str]:
    expected = (sha256 or (model.sha256 if model else None) or "").lower() or None
    info = verify_model_file(path, size=model.size if model else None, sha256=expected)
    if info.sha256:
        hashed = f"SHA-256 {info.sha256} verified"
    else:
        hashed = "SHA-256 not checked (none known: pass --sha256)"
    summary = (
        f"{path}: GGUF v{info.version}, {info.architecture or '?'}, {info.tensors} tensors, "
        f"{_mb(info.size)}, {hashed}"
    )
    return info, summary


def _verify(
    settings: Settings, catalog: list[CatalogModel], what: str | None, sha256: str | None
) -> int:
    path, model = _resolve(settings, catalog, what)
    if sha256 is None and what is None:
        sha256 = settings.model.sha256
    _, summary = _check(path, model, sha256)
    print(f"OK {summary}")
    return 0


def _use(
    settings: Settings,
    catalog: list[CatalogModel],
    what: str,
    config: Path | None,
    installed_as: Path | None = None,
) -> int:
    path, model = _resolve(settings, catalog, what)
    if model is not None and not path.exists():
        raise PullError(f"{path} is not there: qwen-edge model pull {model.name}")
    info, summary = _check(path.absolute(), model, None)
    config = config or DEFAULT_CONFIG_FILE
    name = model.name if model is not None else None
    written = installed_as or path.absolute()
    _rewrite_config(config, written, name, info)
    print(f"OK {summary}")
    print(f"{config}: model.path = {written}")
    if os.environ.get("QWEN_EDGE_MODEL__PATH"):
        _fail("note: QWEN_EDGE_MODEL__PATH is set and wins over the config file")
    print("restart the daemon to serve it: systemctl restart qwen-edge")
    return 0


def _rewrite_config(config: Path, path: Path, name: str | None, info: ModelFileInfo) -> None:
    """Set [model] path (and name) in the TOML file, keeping its comments and layout.

    An existing model.sha256 would belong to the old file: it gets the new file's hash.
    """
    try:
        text = config.read_text(encoding="utf-8") if config.exists() else ""
        doc = tomlkit.parse(text)
    except OSError as exc:
        raise ConfigError(f"config file {config}: {exc.strerror or exc}") from None
    except tomlkit.exceptions.TOMLKitError as exc:
        raise ConfigError(f"config file {config}: {exc}") from None
    table = doc.get("model")
    if not isinstance(table, Table):
        table = tomlkit.table()
        doc.add("model", table)
    table["path"] = str(path)
    if name is not None:
        table["name"] = name
    elif "name" in table:
        del table["name"]
    if "sha256" in table:
        table["sha256"] = info.sha256 or file_sha256(info.path)
    _write_atomically(config, tomlkit.dumps(doc))


def _write_atomically(config: Path, text: str) -> None:
    """Write, check that the result still loads as settings, then rename over the old file."""
    try:
        config.parent.mkdir(parents=True, exist_ok=True)
        mode = config.stat().st_mode & 0o777 if config.exists() else 0o644
        fd, tmp_name = tempfile.mkstemp(prefix=f".{config.name}.", dir=config.parent)
    except OSError as exc:
        raise ConfigError(f"config file {config}: {exc.strerror or exc}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        load_settings(tmp)
        os.replace(tmp, config)
    except OSError as exc:
        raise ConfigError(f"config file {config}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
