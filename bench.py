"""Benchmarks that print their figures: the zero-pruning job's wall time from scratch and from the
cached model beside a tutorial-style version of the same job, training throughput beside this
machine's matrix-multiply speed, and the inference latency of pruned models through
pruning.for_inference against the dense model, beside how much less arithmetic they do.

    python bench.py
    python bench.py --inference-only --skip-state-of-the-art --lenet5
    python bench.py --bars
"""

import cli.startup  # noqa: F401, I001 -- first: settles what must be settled before torch is imported

import copy
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import pruning
from cli import bars, options, run, waiting
from cli.results import markdown_table
from pruning import criteria, measure, surgery, training
from pruning import data as mnist
from pruning import model as models
from pruning.inference import BATCHES

SPARSITIES = [0, 0.5, 0.8, 0.9, 0.95, 0.98]
ACTIVATION_THRESHOLDS = [0.6, 0.8, 0.9, 1.0]
STEP_ROUNDS, STEPS_A_ROUND = 30, 50  # training steps of each kind, taken in turn: the machine's speed drifts
TRAINING_ROUNDS = 5  # of an sgemm timing, 5 epochs of training and 5 more with --bf16
STATE_OF_THE_ART = {  # name: the command, each timed from scratch (training of the dense model included)
    "zero pruning to 98.5% zeros": ["zero_pruning.py", "--sparsity", "0.985", "--steps", "10", "--finetune-epochs", "2",
                                    "--distill"],
    "LeNet-300-100 to 98% zeros": ["zero_pruning.py", "--hidden", "300", "100", "--sparsity", "0.98", "--steps", "10",
                                   "--finetune-epochs", "2", "--distill"],
    "activation pruning to 95% fewer params": ["activation_pruning.py", "--reduction", "0.95", "--steps", "6",
                                               "--finetune-epochs", "4", "--distill", "--prune-inputs"],
    "zero pruning to 98% zeros": ["zero_pruning.py", "--sparsity", "0.98", "--steps", "10", "--finetune-epochs", "2",
                                  "--distill"],
}
FAST_MODELS = {  # the README's models whose inference is timed: (command of STATE_OF_THE_ART, file it saves)
    "98% zeros (CSR file, loaded)": ("zero pruning to 98% zeros", "csr-sparsity0.98.pt"),
    "95% fewer params (loaded)": ("activation pruning to 95% fewer params", "activation-reduction0.95.pt"),
}
LENET5 = {  # name: the README's LeNet-5 command (sharing one trained model), the file it saves
    "LeNet-5, 99% zeros (CSR file, loaded)": (["zero_pruning.py", "--model", "lenet5", "--sparsity", "0.99", "--steps",
                                               "10", "--finetune-epochs", "2", "--distill"], "csr-sparsity0.99.pt"),
    "LeNet-5, 90% fewer params (loaded)": (["activation_pruning.py", "--model", "lenet5", "--reduction", "0.9",
                                            "--steps", "6", "--distill"], "activation-reduction0.9.pt")}
BARS = {"98% zeros (CSR file, loaded)": {1: 5, 32: 8, 10000: 8}, "95% fewer params (loaded)": {1: 6, 10000: 10},
        "50% zeros": {b: 0.95 for b in BATCHES}, "dense": {b: 0.95 for b in BATCHES},
        "LeNet-5, 99% zeros (CSR file, loaded)": {1: 2, 32: 3, 10000: 3},
        "LeNet-5, 90% fewer params, against itself in PyTorch": {32: 1.5, 10000: 1.5},
        "LeNet-5, 50% zeros": {b: 0.95 for b in BATCHES}, "LeNet-5, dense": {b: 0.95 for b in BATCHES}}


BF16_SUPPORT = {True: "multiplies bf16 natively", False: "does not multiply bf16 natively",
                None: "may or may not multiply bf16 natively (no /proc/cpuinfo to tell)"}


def time_job(args, checkpoint, retrain):
    """Wall time of `python zero_pruning.py` as a user runs it, start-up and data loading included."""
    command = [sys.executable, "zero_pruning.py", "--quiet", "--checkpoint", checkpoint, "--threads", str(args.threads)]
    command += ["--data-dir", str(mnist.data_root(args.data_dir))] + (["--retrain"] if retrain else [])
    return time_command(command)


def state_of_the_art_commands(folder, data_dir):
    """STATE_OF_THE_ART as run from scratch: each trains its model into folder, the pruned ones kept in
    folder/<i>, the command's index."""
    return {name: [sys.executable, *command, "--quiet", "--checkpoint", str(Path(folder) / f"mlp-{i}.pt"),
                   "--data-dir", str(data_dir), "--save-dir", str(Path(folder) / str(i))]
            for i, (name, command) in enumerate(STATE_OF_THE_ART.items())}


def saved_file(folder, name):
    """The file a STATE_OF_THE_ART command saved in folder (FAST_MODELS' name)."""
    command, file = FAST_MODELS[name]
    return Path(folder) / str(list(STATE_OF_THE_ART).index(command)) / file


def time_command(command):
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=Path(__file__).parent)
    return time.perf_counter() - start


def tutorial_job(data_dir, save_dir, epochs=5):
    """The zero-pruning job as tutorials write it: torchvision's MNIST with per-sample ToTensor and
    Normalize, a DataLoader of batch 64, the same MLP, recipe and threshold sweep, each pruned model
    evaluated through a DataLoader and saved dense and as CSR. The reference for the job's speed."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train_set = datasets.MNIST(data_dir, train=True, transform=transform)
    test_loader = DataLoader(datasets.MNIST(data_dir, train=False, transform=transform), batch_size=1000)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), models.mlp())
    loader = DataLoader(train_set, batch_size=64, shuffle=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    for t in options.ZERO_THRESHOLDS:
        pruned = surgery.hold_below(copy.deepcopy(model[1]), t)
        correct = 0
        with torch.no_grad():
            for x, y in test_loader:
                correct += (pruned(x.flatten(1)).argmax(1) == y).sum().item()
        surgery.make_permanent(pruned)
        torch.save(pruned.state_dict(), Path(save_dir) / "dense.pt")
        torch.save({k: v.to_sparse_csr() if v.dim() == 2 else v for k, v in pruned.state_dict().items()},
                   Path(save_dir) / f"csr-{t:g}.pt")
        print(f"threshold {t:g}: {correct / 100:.2f}%")


def latency_rows(name, dense, model, x):
    """Per batch size: the dense model's time in PyTorch and pruning.for_inference(model)'s, taken in
    turn (each the median of its rounds), the speed-up, and what share of the arithmetic saved it
    realizes (the speed-up over how many times fewer multiply-adds the model does)."""
    arithmetic = measure.flops(dense, x) / max(1, measure.flops(model, x))
    rows = []
    for batch in BATCHES:
        xb = x[:batch].contiguous()
        t_dense, t_fast = measure.in_turn([torch.no_grad()(dense.eval()), pruning.for_inference(model, batch)], xb)
        bar = BARS.get(name, {}).get(batch)
        rows.append({"model": name, "batch": batch, "dense_ms": 1e3 * t_dense, "pruned_ms": 1e3 * t_fast,
                     "speedup": t_dense / t_fast, "arithmetic": arithmetic, "realized": t_dense / t_fast / arithmetic,
                     "bar": f"{bar:g}x" if bar else ""})
    return rows


COLUMNS = [("Model", "model", str), ("Batch", "batch", "{:,}".format), ("Dense (ms)", "dense_ms", "{:.3f}".format),
           ("for_inference (ms)", "pruned_ms", "{:.3f}".format), ("Speed-up", "speedup", "{:.2f}x".format),
           ("Bar", "bar", str), ("Fewer multiply-adds", "arithmetic", "{:.1f}x".format),
           ("Realized", "realized", "{:.2f}".format)]


ALONE_COLUMNS = [("Model", "model", str), ("Batch", "batch", "{:,}".format),
                 ("Dense (ms)", "dense_ms", "{:.3f}".format), ("for_inference (ms)", "pruned_ms", "{:.3f}".format),
                 ("Speed-up", "speedup", "{:.2f}x".format)]


def alone_row(name, dense_file, file, batch, data_dir):
    """The dense model and for_inference(model in file) each timed alone, in a process of its own,
    on `batch` test images: two models timed in turn in one process share its threads (PyTorch's
    OpenMP workers still spinning, the kernel's), which can slow one by the other's."""
    code = ("import sys, torch, pruning; from pruning.measure import in_turn; "
            "path, batch, fast, root = sys.argv[1], int(sys.argv[2]), sys.argv[3] == 'fast', sys.argv[4]; "
            "x = pruning.mnist(root)[1][0][torch.arange(batch) % 10000].contiguous(); model = pruning.load(path); "
            "run = pruning.for_inference(model, batch) if fast else torch.no_grad()(model); "
            "print(in_turn([run], x)[0])")
    root = str(mnist.data_root(data_dir))
    dense, pruned = (float(subprocess.run([sys.executable, "-c", code, str(path), str(batch), way, root],
                                          capture_output=True, text=True, check=True).stdout.split()[-1])
                     for path, way in ((dense_file, "dense"), (file, "fast")))
    return {"model": name, "batch": batch, "dense_ms": 1e3 * dense, "pruned_ms": 1e3 * pruned,
            "speedup": dense / pruned}


def sgemm_gflops(threads, n=4096, repeats=5):
    """This machine's single-precision matrix-multiply speed: the ceiling for training the MLP."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = measure.inference_time(lambda x: x @ b, a, threads, min_run_time=1.0)
    return 2 * n ** 3 / seconds / 1e9


def training_throughput(args, model, train_data, bf16=False):
    """(seconds, GFLOP/s) of training a fresh copy of the model with the default recipe (or --bf16's):
    6 floating-point operations per weight per example (forward, two backward products)."""
    fresh = models.mnist_mlp(models.widths(model))
    start = time.perf_counter()
    training.train(fresh, train_data, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                   bf16=bf16)
    seconds = time.perf_counter() - start
    return seconds, 6 * models.count_weights(model) * len(train_data[1]) * args.epochs / seconds / 1e9


def step_seconds(args, model, train_data, rounds=STEP_ROUNDS, steps=STEPS_A_ROUND):
    """Median seconds of a training step of a copy of model: plain, with zero pruning's masks held
    (90% zeros), and with distillation from the model too, as fine-tuning in steps runs. The three
    take turns, `steps` steps each, `rounds` times: a machine whose speed drifts slows all alike."""
    threshold = criteria.threshold_for_sparsity(model, 0.9)
    plain, masked, distilled = (copy.deepcopy(model) for _ in range(3))
    x, y = (t[:steps * args.batch_size] for t in train_data)
    teacher = training.logits(model, x)
    kinds = {"plain": (plain, None), "masked": (surgery.hold_below(masked, threshold), None),
             "masked, distilled": (surgery.hold_below(distilled, threshold), teacher)}
    times = {kind: [] for kind in kinds}
    for _ in range(rounds):
        for kind, (net, soft) in kinds.items():
            start = time.perf_counter()
            training.train(net, (x, y), epochs=1, lr=args.lr, batch_size=args.batch_size, seed=args.seed, teacher=soft)
            times[kind].append((time.perf_counter() - start) / steps)
    return {kind: statistics.median(t) for kind, t in times.items()}


def products_per_step(model, batch, threads):
    """Seconds of the matrix products alone of one training step at the step's shapes: per layer
    the forward product and the two backward ones (no input gradient for the first)."""
    layers = models.linears(model)
    operands = []
    for i, layer in enumerate(layers):
        x, w = torch.randn(batch, layer.in_features), torch.randn(layer.out_features, layer.in_features)
        g = torch.randn(batch, layer.out_features)
        operands.append((x, w, g, i > 0))

    def step(_):
        for x, w, g, backward_input in operands:
            torch.mm(x, w.T)
            torch.mm(g.T, x)
            if backward_input:
                torch.mm(g, w)
    return measure.inference_time(step, None, threads, min_run_time=1.0)


def report_load(label):
    """Print what else was running; True when the machine was busy."""
    share = measure.cpu_used_by_others(1.0)
    if share is None:
        print(f"CPU used by other processes {label}: unknown here (no /proc/stat)")
        return False
    busy = share > 0.1
    print(f"CPU used by other processes {label}: {share:.0%}"
          + (" -- the machine is busy, and timings taken now are slower than on an idle one" if busy else ""))
    return busy


def lenet5_rows(args, x):
    """LeNet-5's inference rows: the README's two LeNet-5 commands run from scratch (about 20
    minutes), their files loaded, each against the dense LeNet-5 they started from (the smaller
    one also against itself in PyTorch), and the dense model and 50% of its weights zeroed."""
    x, rows = x.view(-1, 1, 28, 28), []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (command, file) in LENET5.items():
            folder = Path(tmp) / str(len(rows))
            took = time_command([sys.executable, *command, "--quiet", "--checkpoint", str(Path(tmp) / "lenet5.pt"),
                                 "--data-dir", str(mnist.data_root(args.data_dir)), "--save-dir", str(folder)])
            print(f"{name}, from scratch: {took:.0f} s")
            rows.append((name, pruning.load(folder / file)))
        dense = pruning.load(Path(tmp) / "lenet5.pt")
    (zeros, pruned), (smaller, fewer) = rows
    halved = pruning.zero_prune(copy.deepcopy(dense), 0.5)
    return (latency_rows(zeros, dense, pruned, x) + latency_rows(smaller, dense, fewer, x)
            + latency_rows(f"{smaller.split(' (')[0]}, against itself in PyTorch", fewer, fewer, x)
            + latency_rows("LeNet-5, 50% zeros", dense, halved, x) + latency_rows("LeNet-5, dense", dense, dense, x))


def inference_rows(args, state, model, train_data, x):
    """Print the inference tables: the README's models (trained from scratch unless
    --skip-state-of-the-art, each command timed), the dense model itself, and one-shot zero and
    activation pruning of it at several sizes."""
    rows = []
    if not args.skip_state_of_the_art:
        with tempfile.TemporaryDirectory() as tmp:
            for name, command in state_of_the_art_commands(tmp, mnist.data_root(args.data_dir)).items():
                print(f"{name}, from scratch: {time_command(command):.0f} s (bar: 180 s)")
            for name in FAST_MODELS:
                rows += latency_rows(name, model, pruning.load(saved_file(tmp, name)), x)
            alone = [alone_row(name, state.checkpoint_file, saved_file(tmp, name), batch, args.data_dir)
                     for name in FAST_MODELS for batch in BATCHES]
        print(f"\nEach model alone, in a process of its own (torch imported first, as a user does), the dense "
              f"one in PyTorch, for_inference's model in another:\n\n{markdown_table(alone, ALONE_COLUMNS)}\n")
    print(f"Inference: pruning.for_inference(model, batch) against the dense model in PyTorch, timed in turn, "
          f"each the median of {measure.ROUNDS} rounds; {args.threads} threads, {state.machine['cpu']}. Realized: "
          "the speed-up over how many times fewer multiply-adds the model does.\n")
    for s in SPARSITIES:
        threshold = criteria.threshold_for_sparsity(model, s) if s else -1.0
        pruned = surgery.make_permanent(surgery.hold_below(copy.deepcopy(model), threshold))
        rows += latency_rows("dense" if s == 0 else f"{100 * s:.0f}% zeros", model, pruned, x)
    print(markdown_table(rows, COLUMNS) + "\n")
    if args.lenet5:
        print(markdown_table(lenet5_rows(args, x), COLUMNS) + "\n")
    rows = []
    means = pruning.mean_activations(model, train_data[0])
    for t in ACTIVATION_THRESHOLDS:
        pruned, _ = pruning.remove_below(model, means, t)
        reduction = 100 * (1 - models.count_params(pruned) / models.count_params(model))
        widths = "-".join(map(str, models.widths(pruned)[1:-1]))
        rows += latency_rows(f"activation pruning at {t:g}, widths {widths}, {reduction:.1f}% fewer params",
                             model, pruned, x)
    print(markdown_table(rows, COLUMNS) + "\n")


def main():
    p = options.parser(__doc__.split("\n\n")[0], [])
    p.add_argument("--skip-job", action="store_true", help="skip timing the whole zero-pruning job")
    p.add_argument("--skip-tutorial", action="store_true",
                   help="skip the tutorial-style reference job (about 1 minute)")
    p.add_argument("--skip-state-of-the-art", action="store_true",
                   help="skip timing the state-of-the-art pruning commands and the smallest model (about 2 minutes)")
    p.add_argument("--inference-only", action="store_true", help="only time inference (about 5 minutes)")
    p.add_argument("--lenet5", action="store_true",
                   help="also time LeNet-5's inference: the README's LeNet-5 commands from scratch (about 20 minutes)")
    p.add_argument("--bars", action="store_true",
                   help="only run the README's headline commands from scratch, each figure beside its bar "
                        "(about 7 minutes)")
    p.add_argument("--wait-policy", action="store_true",
                   help="only time training with each way OpenMP threads can wait, idle and beside other "
                        "trainings (about 3 minutes)")
    args = p.parse_args()
    if args.device == "cuda":
        raise pruning.UserError("bench.py times inference and training on the CPU: give no --device cuda")
    args.device = "cpu"
    busy = report_load("before")
    if args.wait_policy:
        print(f"A third of a training epoch, {args.threads} threads:\n")
        print(markdown_table(waiting.wait_policy_rows(args), waiting.WAIT_COLUMNS))
        return
    if args.bars:
        rows, seconds = bars.run_all(mnist.data_root(args.data_dir), args.threads)
        print(markdown_table(rows, bars.COLUMNS) + "\n\nSeconds each (the first of each network trains it): "
              + ", ".join(f"{name} {took:.0f} s" for name, took in seconds.items()))
        return
    state = run.prepare(args, [], [])
    model, train_data, _, test_data = run.setup(args, state)
    print()
    if args.inference_only:
        inference_rows(args, state, model, train_data, test_data[0])
        if report_load("after") or busy:
            print("Warning: the machine was busy while these figures were taken; rerun them on an idle machine.")
        return
    if not args.skip_job:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = os.path.join(tmp, "mlp.pt")
            scratch = time_job(args, checkpoint, True)
            cached = sorted(time_job(args, checkpoint, False) for _ in range(3))
            if not args.skip_tutorial:
                root = str(mnist.data_root(args.data_dir))
                tutorial = time_command([sys.executable, "-c", f"import bench; bench.tutorial_job({root!r}, {tmp!r})"])
        print(f"zero_pruning.py from scratch (training + sweep): {scratch:.1f} s")
        if not args.skip_tutorial:
            print(f"the same job written as tutorials write it:      {tutorial:.1f} s, "
                  f"{tutorial / scratch:.1f} times slower (bar: 6)")
        print(f"zero_pruning.py with the cached model:           {cached[1]:.1f} s, the median of 3 runs "
              f"({', '.join(f'{t:.1f}' for t in cached)}) (bar: 3.5 s)\n")

    rounds, bf16 = [], []
    for _ in range(TRAINING_ROUNDS):  # in turn, so that a drift of the machine's speed slows all alike
        gflops = sgemm_gflops(args.threads)
        seconds, throughput = training_throughput(args, model, train_data)
        bound = 6 * models.count_weights(model) * len(train_data[1]) * args.epochs / gflops / 1e9
        rounds.append((seconds / bound, seconds, throughput, gflops, bound))
        bf16.append(training_throughput(args, model, train_data, bf16=True)[0])
    for ratio, seconds, throughput, gflops, bound in rounds:
        print(f"Training, {args.epochs} epochs at batch {args.batch_size}: {seconds:.1f} s, {throughput:.0f} GFLOP/s; "
              f"a 4096 x 4096 sgemm here runs at {gflops:.0f} GFLOP/s, which allows {bound:.1f} s: "
              f"{ratio:.2f} times that")
    median = statistics.median(ratio for ratio, *_ in rounds)
    print(f"The median of the {TRAINING_ROUNDS} rounds: {median:.2f} times (bar: 1.5)")
    fp32 = statistics.median(seconds for _, seconds, *_ in rounds)
    print(f"With --bf16 (bf16 products, fp32 logits), taken in the same rounds: {statistics.median(bf16):.1f} s "
          f"against {fp32:.1f} s, {fp32 / statistics.median(bf16):.2f} times faster (medians); this CPU "
          f"{BF16_SUPPORT[measure.native_bf16()]}\n")
    steps = math.ceil(len(train_data[1]) / args.batch_size)
    step = step_seconds(args, model, train_data)
    dense, masked, distilled = (steps * step[kind] for kind in ("plain", "masked", "masked, distilled"))
    products = products_per_step(model, args.batch_size, args.threads)
    print(f"One epoch ({steps} steps, from the median step of {STEP_ROUNDS} rounds of {STEPS_A_ROUND} taken in turn): "
          f"dense {dense:.2f} s; with zero pruning's masks {masked:.2f} s, {masked / dense:.2f} times dense "
          f"(bar: 1.1); masks and distillation {distilled:.2f} s, {distilled / dense:.2f} times.\n"
          f"Per step: {1e3 * dense / steps:.2f} ms, of which the matrix products alone take {1e3 * products:.2f} ms: "
          f"{1e3 * (dense / steps - products):.2f} ms is other work.\n")

    inference_rows(args, state, model, train_data, test_data[0])
    if report_load("after") or busy:
        print("Warning: the machine was busy while these figures were taken; rerun them on an idle machine.")


if __name__ == "__main__":
    run.main(main)
