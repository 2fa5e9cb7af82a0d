"""Model file verification and the catalog: pure logic on small GGUF files written here."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools.harness import QWEN_TINY
from qwen_edge.node.modelfile import GGML_BLOCKS, ModelError, verify_model_file
from qwen_edge.settings import ConfigError, load_settings
from qwen_edge.tools.catalog import BUILTIN, CatalogError, find, load_catalog


def _write_gguf(path: Path, alignment: int | None = None) -> bytes:
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_block_count(1)
    writer.add_token_list(["<s>", "a", "b", "ab"])
    writer.add_token_scores([0.0, -1.0, -2.0, -3.0])
    writer.add_string("general.description", "tiny")
    writer.add_tensor("a.weight", np.ones((4, 8), dtype=np.float32))
    writer.add_tensor("b.weight", np.ones((3, 5), dtype=np.float16))
    writer.add_tensor("c.bias", np.arange(7, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return _write_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf")


def test_block_sizes_are_ggmls() -> None:
    theirs = {int(t): sizes for t, sizes in gguf.constants.GGML_QUANT_SIZES.items()}
    assert {t: theirs[t] for t in GGML_BLOCKS if t in theirs} == GGML_BLOCKS
    assert len(set(GGML_BLOCKS) & set(theirs)) == len(GGML_BLOCKS)


def test_an_intact_file_is_described(tmp_path: Path, small: bytes) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(small)
    info = verify_model_file(path, size=len(small), sha256=hashlib.sha256(small).hexdigest())
    assert (info.version, info.tensors, info.architecture) == (3, 3, "llama")
    assert info.size == len(small)
    assert info.sha256 == hashlib.sha256(small).hexdigest()
    assert verify_model_file(QWEN_TINY).architecture == "qwen2"


def _tensor_data_end(path: Path) -> int:
    """Where the last tensor's bytes end (the writer pads the file beyond it)."""
    reader = gguf.GGUFReader(str(path))
    return max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)


def test_custom_alignment_is_honoured(tmp_path: Path) -> None:
    path = tmp_path / "a.gguf"
    data = _write_gguf(path, alignment=64)
    end = _tensor_data_end(path)
    assert verify_model_file(path).tensors == 3
    path.write_bytes(data[:end])
    assert verify_model_file(path).tensors == 3
    path.write_bytes(data[: end - 1])
    with pytest.raises(ModelError, match="truncated"):
        verify_model_file(path)


def test_every_truncation_is_refused(tmp_path: Path, small: bytes) -> None:
    path = tmp_path / "cut.gguf"
    path.write_bytes(small)
    end = _tensor_data_end(path)
    assert end > len(small) - 32
    for keep in range(end):
        path.write_bytes(small[:keep])
        with pytest.raises(ModelError, match=f"^model file {re.escape(str(path))}: "):
            verify_model_file(path)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_bytes_give_a_model_error_or_pass_never_a_crash(
    tmp_path: Path, small: bytes, data: st.DataObject
) -> None:
    mutated = bytearray(small)
    # The header and tables are the first few hundred bytes; the rest is tensor data.
    for _ in range(data.draw(st.integers(1, 4))):
        mutated[data.draw(st.integers(0, min(len(small), 400) - 1))] = data.draw(
            st.integers(0, 255)
        )
    path = tmp_path / "mutated.gguf"
    path.write_bytes(bytes(mutated))
    try:
        verify_model_file(path)
    except ModelError as exc:
        assert str(exc).startswith(f"model file {path}: ")
        assert "\n" not in str(exc)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file or directory"),
        (b"", "not a GGUF file (bad header)"),
        (b"PK\x03\x04 a zip file", "not a GGUF file (bad header)"),
        (b"GGUF\x01\x00\x00\x00", "unsupported GGUF version 1"),
        (b"GGUF\x03\x00\x00\x00" + b"\x00" * 16, "no tensors"),
        (b"GGUF\x03\x00\x00\x00" + b"\xff" * 16, "implausible tensor count"),
    ],
)
def test_faults_are_named_in_one_line(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "bad.gguf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(
        ModelError, match=f"^model file {re.escape(str(path))}: .*{re.escape(message)}"
    ):
        verify_model_file(path)


def test_size_and_sha256_are_checked_when_given(tmp_path: Path, small: bytes) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(small)
    with pytest.raises(ModelError, match=f"{len(small)} bytes, expected {len(small) + 1} "):
        verify_model_file(path, size=len(small) + 1)
    with pytest.raises(ModelError, match="an interrupted download"):
        verify_model_file(path, size=len(small) + 1)
    with pytest.raises(ModelError, match=r"SHA-256 is .* expected f{64}"):
        verify_model_file(path, sha256="F" * 64)
    with pytest.raises(ModelError, match="Is a directory"):
        verify_model_file(tmp_path)


# -- settings and catalog ------------------------------------------------------------------------


def test_model_sha256_setting_is_64_hex_digits_in_lower_case(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QWEN_EDGE_MODEL__SHA256", "AB" * 32)
    assert load_settings().model.sha256 == "ab" * 32
    monkeypatch.setenv("QWEN_EDGE_MODEL__SHA256", "ab" * 31)
    with pytest.raises(ConfigError, match="QWEN_EDGE_MODEL__SHA256"):
        load_settings()


def test_builtin_catalog_has_the_three_qwen_builds() -> None:
    quants = {m.quant for m in BUILTIN}
    assert {"Q4_K_M", "Q4_0", "Q8_0"} <= quants
    assert len({m.name for m in BUILTIN}) == len(BUILTIN)
    for model in BUILTIN:
        assert model.name + ".gguf" == model.file
        assert len(model.revision) == 40


def test_catalog_file_adds_and_replaces_entries(tmp_path: Path) -> None:
    extra = tmp_path / "catalog.toml"
    extra.write_text(
        '[[models]]\nname = "qwen2.5-0.5b-instruct-q8_0"\nrepo = "mirror/Qwen-GGUF"\n'
        'file = "qwen2.5-0.5b-instruct-q8_0.gguf"\n'
        '[[models]]\nname = "Mine"\nrepo = "me/x"\nfile = "mine.gguf"\n'
    )
    models = load_catalog(extra)
    assert find(models, "qwen2.5-0.5b-instruct-q8_0").repo == "mirror/Qwen-GGUF"
    assert find(models, "mine").name == "Mine"
    assert find(models, "mine.gguf").name == "Mine"
    with pytest.raises(CatalogError, match="unknown model 'nope'"):
        find(models, "nope")
    extra.write_text("[[models]]\nname = 1\n")
    with pytest.raises(CatalogError, match=f"catalog {extra}: models.0.name"):
        load_catalog(extra)
    extra.write_text("[[models]\n")
    with pytest.raises(CatalogError, match=f"catalog {extra}: "):
        load_catalog(extra)
    with pytest.raises(CatalogError, match="No such file"):
        load_catalog(tmp_path / "missing.toml")
