"""scripts/cmake-args: the CPU's flags; for llama-cpp-python, only the libraries qwen-edge loads."""

import platform
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
X86 = platform.machine() in ("x86_64", "AMD64")


def cmake_args(tmp_path: Path, flags: str, *args: str) -> subprocess.CompletedProcess[str]:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    return subprocess.run(
        [SCRIPTS / "cmake-args", *args],
        env={"PATH": "/usr/bin:/bin", "CPUINFO": str(cpuinfo)},
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.skipif(not X86, reason="the x86-64 branch")
def test_exactly_the_simd_the_cpu_has(tmp_path: Path) -> None:
    out = cmake_args(tmp_path, "fpu sse2 avx avx2 fma f16c").stdout.split()
    assert "-DGGML_AVX2=ON" in out and "-DGGML_FMA=ON" in out
    assert "-DGGML_AVX512=OFF" in out and "-DGGML_AMX_INT8=OFF" in out
    assert "-DGGML_NATIVE=OFF" in out


@pytest.mark.skipif(not X86, reason="the x86-64 branch")
def test_the_binding_build_leaves_out_what_qwen_edge_never_loads(tmp_path: Path) -> None:
    out = cmake_args(tmp_path, "avx2").stdout.split()
    assert "-DLLAVA_BUILD=OFF" in out
    (include,) = [a for a in out if a.startswith("-DCMAKE_PROJECT_llama.cpp_INCLUDE=")]
    path = Path(include.split("=", 1)[1])
    assert path.is_absolute() and path == SCRIPTS / "llama-lib-only.cmake"
    assert "set(LLAMA_BUILD_COMMON OFF)" in path.read_text()


@pytest.mark.skipif(not X86, reason="the x86-64 branch")
def test_llama_server_gets_the_cpu_flags_alone(tmp_path: Path) -> None:
    full = cmake_args(tmp_path, "avx2 fma").stdout.split()
    cpu = cmake_args(tmp_path, "avx2 fma", "--cpu-only").stdout.split()
    assert cpu == [a for a in full if "LLAVA" not in a and "PROJECT" not in a]


def test_an_unknown_argument_is_refused(tmp_path: Path) -> None:
    done = cmake_args(tmp_path, "avx2", "--server")
    assert done.returncode == 2 and "usage" in done.stderr
