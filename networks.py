"""The networks people bring, on MNIST: pytorch/examples' `Net` exactly as written there, and a
ResNet-style network with residual sums and a concatenation, each trained one epoch, then pruned
both ways (90% zeros; half its parameters), each fine-tuned one epoch with distillation; test
accuracy beside the dense model's, and each pruned model saved, loaded (identical logits),
exported to ONNX and run in onnxruntime against the loaded model. A transformer encoder over
MNIST's rows, trained two epochs, pruned without retraining (one_shot) at 50% and 70% zeros and
2:4, from 2,048 training images; and cut to half its parameters (whole attention heads and
feed-forward units) in two steps, each fine-tuned one epoch: written with nn.TransformerEncoderLayer
(transformer), or by hand, as nanoGPT writes its blocks (transformer-by-hand).

    python networks.py --seeds 3
    python networks.py --network ResNet-style --speed   # also each model through for_inference
    python networks.py --network transformer --seeds 3
    python networks.py --network transformer-by-hand --seeds 3
"""

import cli.startup  # noqa: F401, I001 -- first: settles what must be settled before torch is imported

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import run
import pruning
from pruning import inference, measure


class ExamplesNet(nn.Module):  # pytorch/examples, mnist/main.py, as written there
    def __init__(self):
        super(ExamplesNet, self).__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        output = F.log_softmax(x, dim=1)
        return output


class Block(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual sum; a 1x1 projection where the shape changes."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.project = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.project is None else self.project(x)))


class ResNet(nn.Module):
    """A stem, two residual stages (the second with a projection), average and max pooling
    concatenated, and a linear head: 20,026 parameters."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(pruning.Normalize(shape=(1, 28, 28)), nn.Conv2d(1, 16, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU())
        self.stage1, self.stage2 = Block(16, 16, 1), Block(16, 32, 2)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.stage2(self.stage1(self.stem(x)))
        x = torch.cat([F.adaptive_avg_pool2d(x, 1), F.adaptive_max_pool2d(x, 1)], 1)
        return self.fc(torch.flatten(x, 1))


class RowTransformer(nn.Module):
    """MNIST's 28 rows as 28 tokens: each row embedded in 64 features plus a learned position, two
    nn.TransformerEncoderLayer (4 heads, 128 hidden units), the tokens averaged, a linear head."""

    def __init__(self, width=64, heads=4, hidden=128, layers=2):
        super().__init__()
        self.embed = nn.Sequential(pruning.Normalize(shape=(28, 28)), nn.Linear(28, width))
        self.position = nn.Parameter(torch.zeros(28, width))
        layer = nn.TransformerEncoderLayer(width, heads, hidden, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):  # (N, 28, 28) or (N, 1, 28, 28) images -> (N, 10) logits
        return self.fc(self.encoder(self.embed(x) + self.position).mean(1))


class SelfAttention(nn.Module):
    """nanoGPT's CausalSelfAttention without its mask: one projection makes the query, key and value."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads, self.c_attn, self.c_proj = heads, nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class TransformerBlock(nn.Module):
    """nanoGPT's Block: LayerNorm first, attention, LayerNorm, a GELU feed-forward layer, each added back."""

    def __init__(self, width, heads, hidden):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(width), SelfAttention(width, heads), nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class HandWrittenTransformer(RowTransformer):
    """RowTransformer with its two layers written by hand (TransformerBlock), a LayerNorm after them."""

    def __init__(self, width=64, heads=4, hidden=128, layers=2):
        super().__init__(width, heads, hidden, layers)
        blocks = [TransformerBlock(width, heads, hidden) for _ in range(layers)]
        self.encoder = nn.Sequential(*blocks, nn.LayerNorm(width))


TRANSFORMERS = {"transformer": RowTransformer, "transformer-by-hand": HandWrittenTransformer}
ONE_SHOTS = {"reconstruct 50%": (0.5, "reconstruct", None), "magnitude 50%": (0.5, "magnitude", None),
             "reconstruct 70%": (0.7, "reconstruct", None), "magnitude 70%": (0.7, "magnitude", None),
             "wanda 70%": (0.7, "wanda", None), "reconstruct 2:4": (None, "reconstruct", (2, 4))}


def round_trip(model, x, folder):
    """(whether the loaded CSR file gives model's logits exactly, onnxruntime's largest difference from
    the loaded model's, whether for_inference predicts as model does) on x."""
    loaded, onnx = onnx_agrees(model, x, folder)
    expected = pruning.logits(model, x)
    with warnings.catch_warnings():  # that a graph runs as given: the table says what it predicts
        warnings.simplefilter("ignore", UserWarning)
        fast = pruning.for_inference(loaded, example=x[:32])
    return (torch.equal(pruning.logits(loaded, x), expected), onnx,
            torch.equal(pruning.logits(fast, x).argmax(1), expected.argmax(1)))


def transformer_seed(make, seed, train_data, test_data, folder):
    """One seed of the transformer: trained two epochs, then each of ONE_SHOTS from the same 2,048
    training images, and cut to half its parameters; its row of the table, printed, and {column:
    test accuracy}. The files of the 50% and 2:4 reconstructions and of the halved model are checked:
    identical logits once loaded, onnxruntime's largest difference, for_inference's predictions."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    model = pruning.train(make(), train_data, epochs=2, seed=seed)
    images = train_data[0][torch.randperm(len(train_data[0]), generator=torch.Generator().manual_seed(seed))]
    row, checked = {"dense": pruning.accuracy(model, test_data)}, []
    for name, (sparsity, method, pattern) in ONE_SHOTS.items():
        pruned = pruning.one_shot(copy.deepcopy(model), images[:pruning.CALIBRATION], sparsity, method=method,
                                  pattern=pattern)
        row[name] = pruning.accuracy(pruned, test_data)
        if name in ("reconstruct 50%", "reconstruct 2:4"):
            checked.append(round_trip(pruned, test_data[0][:1000], folder))
    finetune = pruning.finetuner(train_data, epochs=1, seed=seed)
    smaller = pruning.activation_prune(model, images[:2000], 0.5, steps=2, finetune=finetune)
    row["half"] = pruning.accuracy(smaller, test_data)
    checked.append(round_trip(smaller, test_data[0][:1000], folder))
    left = pruning.count_params(smaller) / pruning.count_params(model)
    same, onnx, fast = (all(c[0] for c in checked), max(c[1] for c in checked), all(c[2] for c in checked))
    print(f"| {seed} | " + " | ".join(f"{v:.2f}%" for v in row.values()) + f" | {100 * left:.1f}% | "
          f"{'yes' if same else 'NO'} | {onnx:.1e} | {'yes' if fast else 'NO'} | {time.perf_counter() - start:.0f} |",
          flush=True)
    return row


def transformers(make, train_data, test_data, seeds):
    print(f"{make.__name__}, {pruning.count_params(make()):,} parameters\n\n| seed | dense | " + " | ".join(ONE_SHOTS)
          + " | half (heads, units) | parameters left | loaded identical | onnxruntime vs loaded "
          "| for_inference identical | seconds |\n" + "| --- " * (len(ONE_SHOTS) + 8) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [transformer_seed(make, seed, train_data, test_data, Path(tmp)) for seed in range(seeds)]
    for name in ["dense", *ONE_SHOTS, "half"]:
        values = [r[name] for r in rows]
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        print(f"\n{name}: {statistics.mean(values):.2f}%{spread} (each seed: {', '.join(f'{v:.2f}' for v in values)})",
              end="")
    print()


NETWORKS = {"pytorch/examples Net": (ExamplesNet, {"zeros": 0.5, "half": 0.5}),  # and the bars: points below dense
            "ResNet-style": (ResNet, {"half": 1.0})}


def onnx_agrees(model, x, folder):
    """(model saved as CSR and loaded, the largest difference between onnxruntime's outputs and the
    loaded model's on x)."""
    import onnxruntime
    pruning.save(model, folder / "m.pt", "csr")
    loaded = pruning.load(folder / "m.pt")
    pruning.export_onnx(loaded, folder / "m.onnx", example=x[:2])
    out = onnxruntime.InferenceSession(str(folder / "m.onnx")).run(None, {"images": x.numpy()})[0]
    return loaded, (torch.from_numpy(out) - pruning.logits(loaded, x)).abs().max().item()


def one_seed(name, seed, train_data, test_data, folder, models=None):
    make, _ = NETWORKS[name]
    torch.manual_seed(seed)
    start = time.perf_counter()
    model = pruning.train(make(), train_data, epochs=1, seed=seed)
    dense = pruning.accuracy(model, test_data)
    finetune = pruning.finetuner(train_data, epochs=1, seed=seed, teacher=model)
    sparse = pruning.zero_prune(copy.deepcopy(model), 0.9, finetune=finetune)
    smaller = pruning.activation_prune(model, train_data[0][:2000], 0.5, finetune=finetune)
    x = test_data[0][:1000]
    row = {"dense": dense, "zeros": pruning.accuracy(sparse, test_data), "half": pruning.accuracy(smaller, test_data),
           "parameters": f"{pruning.count_params(model):,} to {pruning.count_params(smaller):,}",
           "onnx": max(onnx_agrees(sparse, x, folder)[1], onnx_agrees(smaller, x, folder)[1])}
    if models is not None and seed == 0:  # kept for --speed
        models[name] = {"dense": model, "50% zeros": pruning.zero_prune(copy.deepcopy(model), 0.5), "90% zeros": sparse,
                        "half the parameters": smaller}
    print(f"| {name} | {seed} | {row['dense']:.2f}% | {row['zeros']:.2f}% | {row['half']:.2f}% | "
          f"{row['parameters']} | {row['onnx']:.1e} | {time.perf_counter() - start:.0f} |", flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="the folder holding MNIST/raw (default: $MNIST_DATA_DIR, else ./data)")
    p.add_argument("--seeds", type=int, default=1, choices=range(1, 11), metavar="N", help="seeds 0..N-1 (1 to 10)")
    p.add_argument("--network", choices=[*NETWORKS, *TRANSFORMERS], action="append",
                   help="only this network (default: the two CNNs; 'transformer', 'transformer-by-hand': a "
                   "transformer's table)")
    p.add_argument("--speed", action="store_true", help="also time each CNN's models through pruning.for_inference "
                   "against the dense model at batch 1, 32 and 10,000")
    args = p.parse_args()
    (x, y), (x_test, y_test) = pruning.mnist(args.data_dir)
    train_data, test_data = (x.view(-1, 1, 28, 28), y), (x_test.view(-1, 1, 28, 28), y_test)
    print(f"machine: {measure.machine()['cpu']}, {torch.get_num_threads()} threads\n")
    for name in [n for n in args.network or [] if n in TRANSFORMERS]:
        transformers(TRANSFORMERS[name], train_data, test_data, args.seeds)
        args.network.remove(name)
        if not args.network:
            return
    print("| network | seed | dense | 90% zeros | half the parameters | parameters | onnxruntime vs loaded "
          "| seconds |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    models = {} if args.speed else None
    with tempfile.TemporaryDirectory() as tmp:
        rows = {name: [one_seed(name, seed, train_data, test_data, Path(tmp), models) for seed in range(args.seeds)]
                for name in args.network or NETWORKS}
    for name, seeds in rows.items():
        for key, what in (("zeros", "90% zeros"), ("half", "half the parameters")):
            drops = [r["dense"] - r[key] for r in seeds]
            bar = NETWORKS[name][1].get(key)
            print(f"\n{name}, {what}: {statistics.mean(drops):.2f} points below dense on average (each seed: "
                  f"{', '.join(f'{d:.2f}' for d in drops)})" + (f"; bar: within {bar}" if bar else ""), end="")
    print()
    if models:
        speeds(models, test_data[0])


def speeds(models, x):
    """Each seed-0 model through pruning.for_inference against its dense model in PyTorch, timed in turn
    at batch 1, 32 and 10,000 (inference.speedups), beside how many fewer multiply-adds it does."""
    print("\n| network | model | multiply-adds fewer | batch 1 | batch 32 | batch 10,000 | for_inference |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for name, kept in models.items():
        dense = kept["dense"]
        for what, model in kept.items():
            fewer = pruning.flops(dense, x[:1]) / pruning.flops(model, x[:1])
            times = inference.speedups(dense, model, x)
            summary = pruning.for_inference(model, 32).summary.split(":")[0].split(" (")[0]
            cells = " | ".join(f"{times[str(b)]:.2f}x" for b in inference.BATCHES)
            print(f"| {name} | {what} | {fewer:.1f}x | {cells} | {summary} (batch 32) |", flush=True)


if __name__ == "__main__":
    run.main(main)
