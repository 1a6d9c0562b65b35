import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Before PyTorch's OpenMP starts: the test processes run side by side on the cores, and threads
# that wait by spinning (OpenMP's default, 300,000 times) take the cores the other process's
# threads need; 3,000, as the scripts wait (cli/startup.py), ran the slow tests 1.7 times faster.
os.environ.setdefault("GOMP_SPINCOUNT", "3000")

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
    """The model trained with the default settings, once for all the end-to-end tests: once for
    every worker too when pytest-xdist runs them in several processes (the first trains it, under
    a lock in the folder they share, and the others read it)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # every worker's base folder is in it
    path = shared / "default-mlp.pt"
    with open(shared / "default-mlp.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            result = run_script("zero_pruning.py", "--checkpoint", path, "--thresholds", "0", "--quiet")
            assert result.returncode == 0, result.stderr
    return path


@pytest.fixture(scope="session")
def small_mnist(mnist_dir, tmp_path_factory):
    """A folder of real MNIST's first 3,000 training and 1,000 test images, for the tests that
    check how a run works rather than how accurate its model is."""
    root = tmp_path_factory.mktemp("small")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, magic in mnist.FILES.items():
        full = mnist.read_idx(mnist_dir / "MNIST" / "raw" / name, magic)
        part = full[:3000] if name.startswith("train") else full[:1000]
        header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in part.shape)
        (raw / name).write_bytes(header + part.numpy().tobytes())
    return root


def no_network(monkeypatch):
    """Point torchvision's MNIST download at a closed local port, so that a missing file fails at
    once; torchvision (2 s to import) is imported only when a test reaches the download."""
    download = mnist.download

    def at_a_closed_port(root):
        import torchvision
        monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
        return download(root)

    monkeypatch.setattr(mnist, "download", at_a_closed_port)


SCRIPTS = ("zero_pruning.py", "activation_pruning.py")
RUNS = tempfile.TemporaryDirectory(prefix="pruning-test-runs-")  # removed when the tests end


def script_command(script, *args):
    """The command that runs one of the project's scripts. A pruning script's models go to a new
    temporary folder unless the test gives --save-dir: by default a run keeps them in the
    project's runs/, which the tests would otherwise fill."""
    args = [str(a) for a in args]
    if script in SCRIPTS and "--save-dir" not in args:
        args += ["--save-dir", tempfile.mkdtemp(prefix="run-", dir=RUNS.name)]
    return [sys.executable, str(ROOT / script), *args]


def main_in_process(monkeypatch, script, *args):
    """Run one of the project's entry points as its command line does (sys.argv, cli.run.main),
    in this process: a new one would pay PyTorch's import, 2.5 s. Returns its exit code, 0 when
    its main returns; the signal handlers and thread count the script sets are put back after it."""
    import importlib

    import torch

    from cli import run
    monkeypatch.setattr(sys, "argv", [script, *script_command(script, *args)[2:]])  # models to a temporary folder
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    try:
        run.main(importlib.import_module(Path(script).stem).main)
    except SystemExit as exit:
        return exit.code
    finally:  # what a script's main sets for its own process: its signal handlers, its threads
        for s, handler in handlers.items():
            signal.signal(s, handler)
        torch.set_num_threads(threads)
    return 0


@pytest.fixture
def json_of(capsys, monkeypatch):
    """For a test that reads a run's JSON and stdout, not its log: json_of(script, folder, *args) runs
    the script's main in this process, as its command line runs it, its JSON in folder; exit 0.
    Returns (results, stdout)."""
    def run(script, folder, *args):
        out = folder / f"{script}.json"
        code = main_in_process(monkeypatch, script, *args, "--json", out)
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return json.loads(out.read_text()), captured.out
    return run


def run_script(script, *args, env=None, **kwargs):
    """Run one of the scripts as a user would; returns the CompletedProcess."""
    return subprocess.run(script_command(script, *args), capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, **kwargs)
