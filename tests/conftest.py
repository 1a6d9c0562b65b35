import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pruning import data as mnist  # noqa: E402


@pytest.fixture(scope="session")
def mnist_dir():
    """The real MNIST folder. Missing data skips these tests, unless REQUIRE_MNIST=1 (as in CI) fails them."""
    root = mnist.data_root()
    if not all((root / "MNIST" / "raw" / name).is_file() for name in mnist.FILES):
        message = f"real MNIST not found in {root.resolve()}; set MNIST_DATA_DIR"
        if os.environ.get("REQUIRE_MNIST") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return root.resolve()


@pytest.fixture(scope="session")
def checkpoint(mnist_dir, tmp_path_factory):
    """The model trained with the default settings, once for all the end-to-end tests."""
    path = tmp_path_factory.mktemp("checkpoints") / "mlp.pt"
    result = run_script("zero_pruning.py", "--checkpoint", path, "--thresholds", "0", "--quiet")
    assert result.returncode == 0, result.stderr
    return path


def run_script(script, *args, env=None, **kwargs):
    """Run one of the scripts as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, **(env or {})}, **kwargs)
