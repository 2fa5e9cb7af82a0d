"""The unit tier needs no compiler: tests/unit/ passes with llama.cpp and systemd's bindings (the
`node` extra's compiled parts) made unimportable, as in a venv with `pip install -e '.[test]'`."""

from __future__ import annotations

import subprocess
import sys

from devtools.harness import ROOT

BLOCKED = ("llama_cpp", "systemd")
RUN = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # `import name` raises ImportError
import pytest
sys.exit(pytest.main(["tests/unit", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]))
"""


def test_the_unit_tier_runs_without_llama_cpp_or_systemd() -> None:
    result = subprocess.run(
        [sys.executable, "-c", RUN],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert " passed" in result.stdout
