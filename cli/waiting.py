"""How OpenMP's waiting threads wait, timed: a third of a training epoch with each setting, on an
idle machine and beside other PyTorch trainings (`python bench.py --wait-policy`)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from pruning import data as mnist
from pruning import model as models
from pruning import training

WAIT_SETTINGS = {  # how OpenMP's waiting threads wait (GNU OpenMP, which Linux builds of PyTorch use)
    "spin 300,000 times, then sleep (OpenMP's default)": {"GOMP_SPINCOUNT": "300000"},
    "spin 3,000 times (this project's default)": {"GOMP_SPINCOUNT": "3000"},
    "never spin (OMP_WAIT_POLICY=PASSIVE)": {"OMP_WAIT_POLICY": "PASSIVE"},
}
COMPETITOR = """import torch
torch.set_num_threads(2)
model = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
opt, x, y = torch.optim.Adam(model.parameters()), torch.randn(128, 784), torch.randint(0, 10, (128,))
while True:
    opt.zero_grad(); torch.nn.functional.cross_entropy(model(x), y).backward(); opt.step()
"""


def time_training_part(data_dir, examples, threads):
    """Print the seconds that one epoch over the first `examples` training images takes (run in a child)."""
    torch.set_num_threads(threads)
    (x, y), _ = mnist.load(mnist.data_root(data_dir))
    start = time.perf_counter()
    training.train(models.mnist_mlp(), (x[:examples], y[:examples]), epochs=1)
    print(time.perf_counter() - start)


def wait_policy_rows(args, competitors=(0, 1, 2), rounds=2, examples=20000):
    """A third of a training epoch with each OpenMP wait setting, on an idle machine and beside other
    PyTorch trainings (each on 2 threads, with OpenMP's default), `rounds` times each."""
    plain = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    data = str(mnist.data_root(args.data_dir))
    code = f"from cli import waiting; waiting.time_training_part({data!r}, {examples}, {args.threads})"
    rows, root = [], Path(__file__).parent.parent
    for n in competitors:
        others = [subprocess.Popen([sys.executable, "-c", COMPETITOR], env=plain) for _ in range(n)]
        try:
            time.sleep(2 if n else 0)  # the others past their start-up
            for name, setting in WAIT_SETTINGS.items():
                seconds = [float(subprocess.run([sys.executable, "-c", code], env={**plain, **setting}, check=True,
                                                capture_output=True, text=True, cwd=root).stdout)
                           for _ in range(rounds)]
                rows.append({"setting": name, "others": n, "seconds": ", ".join(f"{t:.2f}" for t in seconds)})
        finally:
            for other in others:
                other.kill()
                other.wait()
    return rows


WAIT_COLUMNS = [("OpenMP threads waiting", "setting", str), ("Other trainings", "others", str),
                ("Seconds, each round", "seconds", str)]
