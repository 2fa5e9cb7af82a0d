"""`qwen-edge model list|pull|verify|use` as a user runs them, against a local fake Hub."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.harness import NODE, PREFIX, QWEN_TINY, ROOT, SMOLLM, Broker, Daemon, Probe

from .fakehub import FakeHub, HubFile

REPO = "test/Tiny-GGUF"
FILE = "tiny-qwen.gguf"
NAME = "tiny-qwen"


@pytest.fixture(scope="module")
def tiny() -> bytes:
    return QWEN_TINY.read_bytes()


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    h = FakeHub()
    yield h
    h.close()


class Node:
    """A node's model directory, catalog file and config file, and the CLI run against them."""

    def __init__(self, tmp: Path, hub: FakeHub) -> None:
        self.dir = tmp / "models"
        self.catalog = tmp / "catalog.toml"
        self.config = tmp / "config.toml"
        self.hub = hub
        self.env: dict[str, str] = {}

    def write_catalog(self, size: int | None, sha256: str | None, name: str = NAME) -> None:
        lines = [
            "[[models]]",
            f'name = "{name}"',
            f'repo = "{REPO}"',
            f'file = "{FILE}"',
            'quant = "F16"',
            'description = "tiny random qwen2 for tests"',
        ]
        if size is not None:
            lines.append(f"size = {size}")
        if sha256 is not None:
            lines.append(f'sha256 = "{sha256}"')
        self.catalog.write_text("\n".join(lines) + "\n")

    def run(
        self, *args: str, config: bool = False, timeout: float = 120, **env: str
    ) -> subprocess.CompletedProcess[str]:
        full = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("QWEN_EDGE_", "HF_")) and k != "TRANSFORMERS_OFFLINE"
        }
        full.update(
            QWEN_EDGE_MODEL__DIR=str(self.dir),
            QWEN_EDGE_MODEL__CATALOG=str(self.catalog),
            HF_ENDPOINT=self.hub.endpoint,
            HF_HOME=str(self.dir.parent / "hf-home"),  # no stored token, no cache of the user's
            HF_HUB_DISABLE_TELEMETRY="1",
        )
        full.update(self.env)
        full.update(env)
        cmd = [sys.executable, "-m", "qwen_edge"]
        if config:
            cmd += ["--config", str(self.config)]
        return subprocess.run(
            [*cmd, "model", *args],
            env=full,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@pytest.fixture
def node(tmp_path: Path, hub: FakeHub, tiny: bytes) -> Node:
    hub.add(REPO, FILE, HubFile(tiny))
    n = Node(tmp_path, hub)
    n.write_catalog(len(tiny), HubFile(tiny).sha256)
    return n


def _listing(node: Node) -> dict[str, Any]:
    result = node.run("list", "--json")
    assert result.returncode == 0, result.stderr
    return {row["name"]: row for row in json.loads(result.stdout)}


# -- pull ----------------------------------------------------------------------------------------


def test_pull_downloads_with_progress_verifies_and_renames_into_place(
    node: Node, hub: FakeHub, tiny: bytes
) -> None:
    assert _listing(node)[NAME]["present"] == "no"
    result = node.run("pull", NAME)
    assert result.returncode == 0, result.stderr
    target = node.dir / FILE
    assert target.read_bytes() == tiny
    assert sorted(p.name for p in node.dir.iterdir()) == [FILE]  # no .partial left behind
    assert "100%" in result.stderr and FILE in result.stderr  # tqdm's bar
    assert f"SHA-256 {HubFile(tiny).sha256} verified" in result.stdout
    assert f"qwen-edge model use {NAME}" in result.stdout
    assert _listing(node)[NAME]["present"] == "yes"
    # Metadata from the Hub, the bytes from its storage.
    assert [r.method for r in hub.seen("hub")] == ["HEAD"]
    assert [r.method for r in hub.seen("storage")] == ["GET"]


def test_pull_of_a_present_model_downloads_nothing(node: Node, hub: FakeHub) -> None:
    assert node.run("pull", NAME, "--quiet").returncode == 0
    requests = len(hub.requests)
    again = node.run("pull", NAME)
    assert again.returncode == 0, again.stderr
    assert "already in" in again.stdout
    assert len(hub.requests) == requests


def test_token_goes_to_the_hub_but_not_to_its_storage(node: Node, hub: FakeHub) -> None:
    result = node.run("pull", NAME, "--quiet", HF_TOKEN="hf_secret_test_token")
    assert result.returncode == 0, result.stderr
    assert hub.seen("hub")[0].headers.get("authorization") == "Bearer hf_secret_test_token"
    assert "authorization" not in hub.seen("storage")[0].headers
    assert "hf_secret_test_token" not in result.stdout + result.stderr


def test_interrupted_pull_resumes_where_it_stopped(node: Node, hub: FakeHub, tiny: bytes) -> None:
    # The connection drops at 15 MB; huggingface_hub has written its first 10 MiB read, retries
    # at once from there (Range) and gets 503, and gives up.
    hub.faults.cut_after = 15_000_000
    hub.faults.fail_gets = 1
    first = node.run("pull", NAME)
    assert first.returncode == 1
    assert "run the pull again to resume" in first.stderr
    cut = 10 << 20  # huggingface_hub's read size
    assert [r.headers.get("range") for r in hub.seen("storage")] == [None, f"bytes={cut}-"]
    partial = node.dir / f"{FILE}.partial"
    assert partial.stat().st_size == cut
    assert not (node.dir / FILE).exists()  # nothing under the model's name until verified
    assert _listing(node)[NAME]["present"] == f"partial {100 * cut // len(tiny)}%"

    second = node.run("pull", NAME)
    assert second.returncode == 0, second.stderr
    assert "resumed at 10.5 MB" in second.stdout
    assert hub.seen("storage")[-1].headers["range"] == f"bytes={cut}-"
    assert (node.dir / FILE).read_bytes() == tiny
    assert not partial.exists()


def test_corrupt_download_is_deleted_and_nothing_is_put_in_place(
    node: Node, hub: FakeHub, tiny: bytes
) -> None:
    bad = bytearray(tiny)
    bad[len(bad) // 2] ^= 0xFF  # one flipped bit in the tensor data: only the hash can tell
    hub.files[(REPO, FILE)].served = bytes(bad)
    result = node.run("pull", NAME, "--quiet")
    assert result.returncode == 1
    assert "SHA-256 is" in result.stderr and "the download was deleted" in result.stderr
    assert list(node.dir.iterdir()) == []


def test_without_a_catalog_hash_the_hubs_lfs_sha256_is_checked(
    node: Node, hub: FakeHub, tiny: bytes
) -> None:
    node.write_catalog(None, None)
    # The Hub advertises (and names the blob by) a hash the bytes do not have.
    hub.files[(REPO, FILE)] = HubFile(tiny, sha256="ab" * 32)
    result = node.run("pull", NAME, "--quiet")
    assert result.returncode == 1
    assert f"expected {'ab' * 32}" in result.stderr
    assert list(node.dir.iterdir()) == []

    hub.files[(REPO, FILE)] = HubFile(tiny)
    ok = node.run("pull", NAME, "--quiet")
    assert ok.returncode == 0, ok.stderr
    assert f"SHA-256 {HubFile(tiny).sha256} verified" in ok.stdout


def test_a_hub_file_that_differs_from_the_catalog_is_not_downloaded(
    node: Node, hub: FakeHub, tiny: bytes
) -> None:
    hub.files[(REPO, FILE)] = HubFile(tiny + b"\0" * 32)  # another version of the file
    result = node.run("pull", NAME)
    assert result.returncode == 1
    assert "the catalog expects" in result.stderr and "refusing" in result.stderr
    assert hub.seen("storage") == []


def test_offline_mode_says_what_to_do_and_sends_nothing(node: Node, hub: FakeHub) -> None:
    result = node.run("pull", NAME, HF_HUB_OFFLINE="1")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "HF_HUB_OFFLINE is set" in result.stderr and FILE in result.stderr
    assert hub.requests == []
    # A model already present needs no network: offline, pull just verifies it.
    assert node.run("pull", NAME, "--quiet").returncode == 0
    again = node.run("pull", NAME, HF_HUB_OFFLINE="1")
    assert again.returncode == 0, again.stderr
    assert "already in" in again.stdout


def test_missing_file_or_repository_on_the_hub_is_one_clear_line(node: Node) -> None:
    node.catalog.write_text(
        node.catalog.read_text()
        + '\n[[models]]\nname = "gone"\nrepo = "test/Tiny-GGUF"\nfile = "gone.gguf"\n'
        + '\n[[models]]\nname = "norepo"\nrepo = "nobody/None"\nfile = "x.gguf"\n'
    )
    for name in ("gone", "norepo"):
        result = node.run("pull", name)
        assert result.returncode == 1
        assert "not found on http://127.0.0.1" in result.stderr
        assert "Traceback" not in result.stderr
    unknown = node.run("pull", "no-such-model")
    assert unknown.returncode == 1
    assert "unknown model 'no-such-model'; known: qwen2.5-0.5b-instruct-q4_k_m" in unknown.stderr


# -- pull into a directory the service account can write ------------------------------------------
# The models directory is the daemon's (StateDirectory=), the pull runs as root: nothing planted
# there may turn root's writes (or reads) elsewhere.


def _refused_once(result: subprocess.CompletedProcess[str], path: Path, kind: str) -> None:
    _refused_because(result, path, f"is {kind}, not a regular file")


def _refused_because(result: subprocess.CompletedProcess[str], path: Path, why: str) -> None:
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"qwen-edge: {path} {why}: refusing to use it (remove it, then run the pull again)"
    ]


def _victim(tmp_path: Path) -> tuple[Path, bytes, int]:
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's precious file\n")
    os.utime(victim, ns=(1_000_000_000, 1_000_000_000))
    return victim, victim.read_bytes(), victim.stat().st_mtime_ns


def test_pull_never_writes_through_a_symlink_planted_as_the_partial_file(
    node: Node, hub: FakeHub, tmp_path: Path
) -> None:
    victim, content, mtime = _victim(tmp_path)
    node.dir.mkdir()
    partial = node.dir / f"{FILE}.partial"
    partial.symlink_to(victim)
    result = node.run("pull", NAME, "--quiet", timeout=30)
    assert victim.read_bytes() == content and victim.stat().st_mtime_ns == mtime
    _refused_once(result, partial, "a symbolic link")
    assert partial.is_symlink()  # left for the admin to look at
    assert not (node.dir / FILE).exists()
    assert hub.seen("storage") == []  # refused before a byte was fetched


def test_pull_never_writes_through_a_hard_link_planted_as_the_partial_file(
    node: Node, tmp_path: Path
) -> None:
    victim, content, mtime = _victim(tmp_path)
    node.dir.mkdir()
    partial = node.dir / f"{FILE}.partial"
    os.link(victim, partial)
    result = node.run("pull", NAME, "--quiet", timeout=30)
    assert victim.read_bytes() == content and victim.stat().st_mtime_ns == mtime
    _refused_because(result, partial, "has 2 names (hard links)")


@pytest.mark.parametrize("kind", ["a FIFO", "a directory"])
def test_a_fifo_or_directory_as_the_partial_file_is_refused_without_hanging(
    node: Node, kind: str
) -> None:
    node.dir.mkdir()
    partial = node.dir / f"{FILE}.partial"
    if kind == "a FIFO":
        os.mkfifo(partial)
    else:
        partial.mkdir()
    result = node.run("pull", NAME, "--quiet", timeout=30)
    _refused_once(result, partial, kind)


def test_a_symlink_at_the_models_name_is_neither_read_nor_written_through(
    node: Node, tmp_path: Path, tiny: bytes
) -> None:
    # A valid model behind the link: followed, the pull would call it present and done.
    elsewhere = tmp_path / "elsewhere.gguf"
    elsewhere.write_bytes(tiny)
    node.dir.mkdir()
    target = node.dir / FILE
    target.symlink_to(elsewhere)
    result = node.run("pull", NAME, "--quiet", timeout=30)
    _refused_once(result, target, "a symbolic link")
    assert target.is_symlink() and elsewhere.read_bytes() == tiny

    target.unlink()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    target.symlink_to(fifo)  # followed, reading it would wait for a writer forever
    _refused_once(node.run("pull", NAME, "--quiet", timeout=30), target, "a symbolic link")

    target.unlink()
    os.mkfifo(target)
    _refused_once(node.run("pull", NAME, "--quiet", timeout=30), target, "a FIFO")


def test_a_models_directory_swapped_for_a_symlink_is_refused(
    node: Node, hub: FakeHub, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    node.dir.symlink_to(elsewhere)
    result = node.run("pull", NAME, "--quiet", timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"qwen-edge: models directory {node.dir} is a symbolic link: set model.dir to the "
        "directory itself"
    ]
    assert list(elsewhere.iterdir()) == []
    assert hub.seen("storage") == []


def test_a_partial_file_swapped_during_the_download_is_not_called_the_model(
    node: Node, hub: FakeHub, tmp_path: Path, tiny: bytes
) -> None:
    # While the pull writes, the name .partial is made a link to a valid model elsewhere: the pull
    # verifies what it wrote, not what the name points at, and notices what its rename moved.
    elsewhere = tmp_path / "elsewhere.gguf"
    elsewhere.write_bytes(tiny)
    partial = node.dir / f"{FILE}.partial"

    def swap() -> None:
        partial.unlink()
        partial.symlink_to(elsewhere)

    hub.faults.before_body = swap
    result = node.run("pull", NAME, "--quiet", timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"qwen-edge: {partial} was replaced while it was being put in place: {node.dir / FILE} "
        "is not the verified download; remove it and run the pull again"
    ]
    assert elsewhere.read_bytes() == tiny
    # What the rename moved is a link, which the next pull refuses rather than follows.
    assert (node.dir / FILE).is_symlink()


# -- list ----------------------------------------------------------------------------------------


def test_list_shows_the_qwen_builds_with_source_size_and_sha256(node: Node) -> None:
    rows = _listing(node)
    for quant in ("q4_k_m", "q4_0", "q8_0"):
        row = rows[f"qwen2.5-0.5b-instruct-{quant}"]
        assert row["repo"] == "Qwen/Qwen2.5-0.5B-Instruct-GGUF"
        assert row["file"] == f"qwen2.5-0.5b-instruct-{quant}.gguf"
        assert row["present"] == "no"
    assert rows["qwen2.5-0.5b-instruct-q4_k_m"]["size"] == 491_400_032
    assert rows["qwen2.5-0.5b-instruct-q8_0"]["sha256"].startswith("ca59ca7f")
    text = node.run("list")
    assert text.returncode == 0
    assert "74a4da8c9fdbcd15bd1f6d01d621410d31c6fc00986f5eb687824e7b93d7a9db" in text.stdout
    assert "Qwen/Qwen2.5-0.5B-Instruct-GGUF@" in text.stdout


def test_a_broken_catalog_file_is_named(node: Node) -> None:
    node.catalog.write_text('[[models]]\nname = "x"\nrepo = "a/b"\nfile = "x.bin"\n')
    result = node.run("list")
    assert result.returncode == 1
    assert f"catalog {node.catalog}: models.0.file" in result.stderr


# -- verify --------------------------------------------------------------------------------------


def test_verify_checks_layout_size_and_sha256(node: Node, tiny: bytes) -> None:
    assert node.run("pull", NAME, "--quiet").returncode == 0
    ok = node.run("verify", NAME)
    assert ok.returncode == 0, ok.stderr
    assert "GGUF v3, qwen2, 26 tensors" in ok.stdout and "verified" in ok.stdout

    (node.dir / FILE).write_bytes(tiny[:-1000])
    short = node.run("verify", NAME)
    assert short.returncode == 3
    assert f"{len(tiny) - 1000} bytes, expected {len(tiny)}" in short.stderr

    by_path = node.run("verify", str(SMOLLM), "--sha256", "0" * 64)
    assert by_path.returncode == 3
    assert "SHA-256 is" in by_path.stderr and "expected " + "0" * 64 in by_path.stderr
    assert node.run("verify", str(SMOLLM)).returncode == 0


def test_verify_refuses_a_fifo_without_waiting_for_a_writer(node: Node, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    result = node.run("verify", str(fifo), timeout=30)
    assert result.returncode == 3
    assert f"model file {fifo}: a FIFO, not a regular file" in result.stderr


def test_verify_without_argument_checks_the_configured_model(node: Node, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(SMOLLM.read_bytes()[: 50 << 20])
    result = node.run("verify", QWEN_EDGE_MODEL__PATH=str(cut))
    assert result.returncode == 3
    assert "damaged or truncated GGUF" in result.stderr and str(cut) in result.stderr
    ok = node.run("verify", QWEN_EDGE_MODEL__PATH=str(SMOLLM))
    assert ok.returncode == 0, ok.stderr


# -- use -----------------------------------------------------------------------------------------


def test_use_rewrites_the_config_keeping_its_comments(node: Node) -> None:
    original = (ROOT / "deploy" / "config.example.toml").read_text()
    node.config.write_text(original)
    refused = node.run("use", NAME, config=True)
    assert refused.returncode == 1
    assert f"qwen-edge model pull {NAME}" in refused.stderr
    assert node.config.read_text() == original

    assert node.run("pull", NAME, "--quiet").returncode == 0
    result = node.run("use", NAME, config=True)
    assert result.returncode == 0, result.stderr
    text = node.config.read_text()
    assert f'path = "{node.dir / FILE}"' in text
    assert f'name = "{NAME}"' in text
    # Everything else, comments included, is as it was.
    diff = [
        line
        for line in difflib.ndiff(original.splitlines(), text.splitlines())
        if line[:2] in ("- ", "+ ")
    ]
    assert sorted(diff) == sorted(
        [
            '- path = "/var/lib/qwen-edge/models/qwen2.5-0.5b-instruct-q4_k_m.gguf"',
            f'+ path = "{node.dir / FILE}"',
            f'+ name = "{NAME}"',
        ]
    )
    shown = subprocess.run(
        [sys.executable, "-m", "qwen_edge", "--config", str(node.config), "config"],
        env={k: v for k, v in os.environ.items() if not k.startswith("QWEN_EDGE_")},
        capture_output=True,
        text=True,
        check=True,
    )
    model = json.loads(shown.stdout)["model"]
    assert model["path"] == str(node.dir / FILE) and model["name"] == NAME


def test_use_refuses_a_corrupt_file_and_leaves_the_config_alone(node: Node, tmp_path: Path) -> None:
    node.config.write_text('# mine\n[model]\npath = "/old.gguf"\nname = "old"\n')
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 100)
    result = node.run("use", str(bad), config=True)
    assert result.returncode == 3
    assert node.config.read_text() == '# mine\n[model]\npath = "/old.gguf"\nname = "old"\n'


def test_use_of_a_path_drops_the_old_name_and_updates_a_pinned_sha256(
    node: Node, tmp_path: Path
) -> None:
    node.config.write_text(
        f'[model]\npath = "/old.gguf"\nname = "old"\nsha256 = "{"0" * 64}"  # pinned\n'
    )
    result = node.run("use", str(SMOLLM), config=True)
    assert result.returncode == 0, result.stderr
    text = node.config.read_text()
    assert f'path = "{SMOLLM}"' in text
    assert "name" not in text  # the file name is the model's name now
    digest = hashlib.sha256(SMOLLM.read_bytes()).hexdigest()
    assert f'sha256 = "{digest}"  # pinned' in text


def test_use_installed_as_checks_the_file_and_writes_where_it_will_be(node: Node) -> None:
    # scripts/install's edit: the file is checked where it is, the config names where it goes.
    original = (ROOT / "deploy" / "config.example.toml").read_text()
    node.config.write_text(original)
    result = node.run(
        "use", str(SMOLLM), "--installed-as", "/var/lib/qwen-edge/models/s.gguf", config=True
    )
    assert result.returncode == 0, result.stderr
    text = node.config.read_text()
    assert 'path = "/var/lib/qwen-edge/models/s.gguf"' in text
    assert len(text.splitlines()) == len(original.splitlines())  # comments and layout kept


# -- end to end ----------------------------------------------------------------------------------


def test_pulled_and_used_model_is_what_the_daemon_serves_and_names(
    node: Node, broker: Broker, tmp_path: Path
) -> None:
    assert node.run("pull", NAME, "--quiet").returncode == 0
    node.config.write_text("# a node\n[model]\nn_ctx = 1024\n")
    assert node.run("use", NAME, config=True).returncode == 0
    watcher = Probe(broker, "modelwatch")
    d = Daemon(tmp_path / "d", broker, None, node.config, QWEN_EDGE_MODEL__THREADS="1")
    try:
        watcher.subscribe(f"{PREFIX}/{NODE}/status")
        d.start()
        deadline = time.monotonic() + 30
        status: dict[str, Any] = {}
        while status.get("state") != "online":
            assert time.monotonic() < deadline, "no online status"
            _topic, status, _ = watcher.next_message(timeout=deadline - time.monotonic())
        assert status["model"] == NAME
        loaded = [e for e in d.log_events() if e.get("event") == "model_loaded"]
        assert loaded[0]["path"] == str(node.dir / FILE)
        dev = Probe(broker, "modeluser")
        dev.subscribe(dev.reply_topic())
        msgs = dev.collect(dev.request("Hi", max_tokens=3), timeout=60)
        assert msgs[0]["model"] == NAME
        assert msgs[-1]["type"] == "done"
        dev.close()
    finally:
        watcher.close()
        d.stop()


def test_a_models_dir_that_cannot_be_written_is_named(node: Node, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the directory should be")
    result = node.run("pull", NAME, QWEN_EDGE_MODEL__DIR=str(blocker))
    assert result.returncode == 1
    assert f"models directory {blocker}: File exists" in result.stderr
    assert "Traceback" not in result.stderr
