"""The written style: ruff as configured in pyproject.toml, modules of one concept each (at most
400 lines), and `import pruning` light."""

import subprocess
import sys

from conftest import ROOT


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_source_file_is_over_400_lines():
    sources = [*ROOT.glob("*.py"), *(ROOT / "pruning").glob("*.py"), *(ROOT / "cli").glob("*.py")]
    assert {p.relative_to(ROOT).as_posix(): n for p in sources if (n := len(p.read_text().splitlines())) > 400} == {}


def test_importing_the_library_imports_no_compiler_plotting_or_onnx():
    code = ("import sys, pruning; "
            "print(sorted(m for m in ('llvmlite', 'matplotlib', 'onnx', 'onnxruntime') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
