"""The networks people bring: pytorch/examples' MNIST Net as written there, MLPs of every common
activation, every flatten spelling, functions and modules nested as users write them, a ResNet
with residual sums and a concatenation; each pruned both ways, saved, loaded back exactly and
exported. Files that keep the dtype, padding="same",
more parameters than the default bound, and the compressed format from any model."""

import copy

import onnxruntime
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pruning
from networks import ExamplesNet, ResNet
from pruning import chain, channels


class Reshaped(nn.Module):
    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.conv, self.fc1, self.fc2 = nn.Conv2d(1, 4, 5), nn.Linear(4 * 12 * 12, 16), nn.Linear(16, 10)

    def forward(self, x):
        x = F.max_pool2d(F.gelu(self.conv(x)), 2)
        x = {"view -1": lambda: x.view(-1, 4 * 12 * 12), "view size": lambda: x.view(x.size(0), -1),
             "reshape shape": lambda: x.reshape(x.shape[0], -1), "method": lambda: x.flatten(1),
             "torch.reshape": lambda: torch.reshape(x, (-1, 576))}[self.spelling]()
        return torch.log_softmax(self.fc2(F.leaky_relu(self.fc1(x), 0.1)), dim=-1)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 32)

    def forward(self, x):
        return torch.tanh(self.fc(x))


def round_trips(model, x, tmp_path, storage="dense"):
    pruning.save(model, tmp_path / "m.pt", storage)
    loaded = pruning.load(tmp_path / "m.pt")
    model.eval()
    return torch.equal(loaded(x), model(x)), loaded


def test_the_pytorch_examples_mnist_net_is_read_pruned_both_ways_and_saved(tmp_path):
    torch.manual_seed(0)
    model, x = ExamplesNet(), torch.rand(16, 1, 28, 28)
    assert [type(m).__name__ for m in chain.layers(model)] == [
        "Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d", "Dropout", "Flatten", "Linear", "ReLU", "Dropout", "Linear",
        "LogSoftmax"]
    smaller = pruning.activation_prune(model, x, 0.5)
    assert pruning.count_params(smaller) <= 0.5 * pruning.count_params(model)
    same, _ = round_trips(smaller, x, tmp_path)
    assert same
    pruning.zero_prune(model, 0.9)
    assert pruning.count_zeros(model) / pruning.count_weights(model) == pytest.approx(0.9, abs=1e-5)
    same, loaded = round_trips(model, x, tmp_path, "csr")
    assert same


@pytest.mark.parametrize("activation", [nn.GELU(), nn.SiLU(), nn.Tanh(), nn.LeakyReLU(0.2), nn.ELU(0.5),
                                        nn.Sigmoid(), nn.ReLU6(), nn.Hardswish(), nn.Softplus(2.0)])
def test_an_mlp_of_any_elementwise_activation_is_pruned_both_ways_and_round_trips_exactly(activation, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), activation, nn.AlphaDropout(0.1), nn.Linear(64, 32),
                          activation, nn.Linear(32, 10), nn.LogSoftmax(1))
    x = torch.rand(64, 1, 28, 28)
    smaller = pruning.activation_prune(model, x, 0.5)
    assert pruning.model.widths(smaller)[1:] < (64, 32, 10) and pruning.count_params(smaller) <= 0.5 * 52650
    assert round_trips(smaller, x, tmp_path)[0]
    pruning.zero_prune(model, 0.9)
    same, loaded = round_trips(model, x, tmp_path, "csr")
    assert same and type(loaded[2]) is type(activation) and repr(loaded[2]) == repr(activation)
    assert torch.equal(pruning.for_inference(loaded, example=x)(x).argmax(1), model(x).argmax(1))


def test_a_unit_of_a_signed_activation_is_ranked_by_its_spread_and_its_mean_folded_when_it_goes():
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.0, 0.0], [0.0, 1.0]])), model[0].bias.copy_(torch.tensor([-3.0, 0.0]))
    x = torch.rand(64, 2)  # unit 0 is tanh(-3) whatever the input: strongly negative, and carries nothing
    activity = pruning.mean_activations(model, x)[0]
    assert activity[0] == 0 and torch.allclose(activity[1], torch.tanh(x[:, 1]).double().std(unbiased=False).float())
    smaller = pruning.activation_prune(model, x, 0.4, criterion="activation")
    assert pruning.model.widths(smaller) == (2, 1, 1) and smaller[0].weight[0, 1] == 1  # unit 1 stays
    assert torch.allclose(smaller(x), model(x), atol=1e-6)  # unit 0's constant went into the next bias


@pytest.mark.parametrize("spelling", ["view -1", "view size", "reshape shape", "method", "torch.reshape"])
def test_every_flatten_spelling_is_read_as_a_flatten(spelling, tmp_path):
    torch.manual_seed(0)
    model, x = Reshaped(spelling), torch.rand(8, 1, 28, 28)
    assert [type(m).__name__ for m in chain.layers(model)] == [
        "Conv2d", "GELU", "MaxPool2d", "Flatten", "Linear", "LeakyReLU", "Linear", "LogSoftmax"]
    assert round_trips(pruning.activation_prune(model, x, 0.5), x, tmp_path)[0]


def test_modules_of_ones_own_nested_in_sequentials_and_used_twice_are_read_as_they_run(tmp_path):
    relu = nn.ReLU()
    model = nn.Sequential(nn.Flatten(), Block(), nn.Sequential(nn.Linear(32, 16), relu), nn.Linear(16, 16), relu,
                          nn.Linear(16, 10))
    assert [type(m).__name__ for m in chain.layers(model)] == [
        "Flatten", "Linear", "Tanh", "Linear", "ReLU", "Linear", "ReLU", "Linear"]
    x = torch.rand(8, 1, 28, 28)
    assert round_trips(pruning.activation_prune(model, x, 0.3), x, tmp_path)[0]


def test_softmax_between_layers_or_over_the_batch_is_refused():
    with pytest.raises(pruning.NotAChain, match="stands between two pruned layers"):
        pruning.activation_prune(nn.Sequential(nn.Linear(4, 4), nn.Softmax(1), nn.Linear(4, 2)), torch.rand(4, 4), 0.5)

    class OverTheBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return F.log_softmax(self.fc(x), dim=0)
    with pytest.raises(pruning.NotAChain, match="only over the classes"):
        pruning.activation_prune(OverTheBatch(), torch.rand(4, 4), 0.5)


# Files that keep what they were given ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("storage", ["dense", "csr"])
def test_a_model_round_trips_with_its_dtype(dtype, storage, tmp_path):
    torch.manual_seed(0)
    model = pruning.zero_prune(pruning.mnist_mlp([784, 32, 10]), 0.5).to(dtype)
    x = torch.rand(8, 784, dtype=dtype)
    same, loaded = round_trips(model, x, tmp_path, storage)
    assert same and {p.dtype for p in loaded.parameters()} == {dtype}


def test_padding_same_and_other_conv_settings_are_stored(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding="same", padding_mode="reflect"), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding="valid"), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    same, loaded = round_trips(model, torch.rand(2, 1, 28, 28), tmp_path)
    assert same and loaded[0].padding == "same" and loaded[0].padding_mode == "reflect"


def test_the_parameter_bound_follows_the_files_size_or_the_argument_of_load(tmp_path):
    model = nn.Sequential(nn.Linear(4000, 3000), nn.ReLU(), nn.Linear(3000, 10))
    pruning.save(model, tmp_path / "m.pt")
    assert pruning.count_params(pruning.load(tmp_path / "m.pt")) == 12_033_010
    with pytest.raises(pruning.UserError, match="12,033,010 parameters, more than the 10,000,000 allowed"):
        pruning.load(tmp_path / "m.pt", max_params=10_000_000)
    saved = torch.load(tmp_path / "m.pt", weights_only=True)
    saved["tensors"] = {}  # the same claim in a file of a few hundred bytes
    torch.save(saved, tmp_path / "small.pt")
    with pytest.raises(pruning.UserError, match="12,033,010 parameters, more than the 10,000,000 allowed"):
        pruning.load(tmp_path / "small.pt")
    with pytest.raises(pruning.UserError, match="48,134,557 bytes, more than any model file"):
        pruning.load(tmp_path / "m.pt", max_params=1000)


def test_save_writes_the_compressed_file_from_any_model_and_load_reads_it_back_exactly(tmp_path):
    torch.manual_seed(0)
    model = pruning.zero_prune(pruning.mnist_mlp([784, 64, 10]), 0.9)
    size = pruning.save(model, tmp_path / "m.bin", storage="compressed", bits=5)
    loaded, x = pruning.load(tmp_path / "m.bin"), torch.rand(32, 784)
    quantized = pruning.formats.compressed.quantize(model, 5).eval()
    assert torch.equal(loaded(x), quantized(x)) and size < pruning.save(model, tmp_path / "m.pt", "csr") / 3
    with pytest.raises(ValueError, match="bits must be a whole number from 1 to 8"):
        pruning.save(model, tmp_path / "m.bin", storage="compressed", bits=9)
    half = model.to(torch.bfloat16)
    pruning.save(half, tmp_path / "h.bin", storage="compressed")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}  # the caller's model left in its dtype


@pytest.mark.slow  # seconds of torch.onnx's exporter
def test_export_onnx_takes_the_input_shape_the_model_records_or_refuses(tmp_path):
    torch.manual_seed(0)
    model = pruning.mnist_mlp([784, 16, 10])
    pruning.export_onnx(model, tmp_path / "m.onnx")
    x = torch.rand(3, 784)
    out = onnxruntime.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"images": x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(out), model.eval()(x), atol=1e-5)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))
    with pytest.raises(ValueError, match="export_onnx needs example="):
        pruning.export_onnx(conv, tmp_path / "c.onnx")


# Residual sums and concatenations ----------------------------------------------------------------

def test_channels_joined_by_a_sum_go_together_and_a_concatenation_keeps_its_offsets(tmp_path):
    torch.manual_seed(0)
    model, x = ResNet(), torch.rand(32, 1, 28, 28)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    smaller = pruning.activation_prune(model, x, 0.5)
    assert pruning.count_params(smaller) <= 0.5 * pruning.count_params(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and model.training
    convs = [layer for layer in smaller.layers if isinstance(layer, nn.Conv2d)]
    stem, stage1_in, stage1_out, stage2_in, stage2_out, project = (c.weight.shape for c in convs)
    assert stem[0] == stage1_in[1] == stage1_out[0] == stage2_in[1] == project[1]  # one space: the stem's and stage 1's
    assert stage2_out[0] == project[0]  # the two branches of stage 2's sum
    assert smaller.layers[-1].weight.shape[1] == 2 * project[0]  # average and max pooling side by side
    smaller.eval()
    for storage in ("dense", "csr"):
        same, loaded = round_trips(smaller, x, tmp_path, storage)
        assert same and isinstance(loaded, pruning.graph.Graph)


@pytest.mark.slow  # seconds of torch.onnx's exporter
@pytest.mark.parametrize("make", [ExamplesNet, ResNet])
def test_a_pruned_cnn_and_residual_network_export_to_onnx_as_they_predict(make, tmp_path):
    torch.manual_seed(0)
    model, x = make(), torch.rand(16, 1, 28, 28)
    smaller = pruning.zero_prune(pruning.activation_prune(model, x, 0.5), 0.5).eval()
    _, loaded = round_trips(smaller, x, tmp_path, "csr")
    pruning.export_onnx(loaded, tmp_path / "m.onnx", example=x)
    out = onnxruntime.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"images": x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(out), loaded(x), atol=1e-4)


@torch.no_grad()
def test_removing_channels_that_pass_on_nothing_keeps_every_output_of_a_residual_network():
    torch.manual_seed(0)
    model = ResNet().eval()
    joined = pruning.graph.of(model)
    spaces, seen = channels.layout(joined, torch.rand(2, 1, 28, 28))
    stage2 = spaces.find(seen[[k for k, layer in enumerate(joined.layers) if isinstance(layer, nn.Conv2d)][-1]][0][0])
    keep = {stage2: torch.arange(32) != 7}  # channel 7 of stage 2: zero in both branches and in the head
    for layer in (model.stage2.bn2, model.stage2.project[1]):
        layer.weight[7], layer.bias[7] = 0, 0
    x = torch.rand(8, 1, 28, 28)
    smaller = channels.shrunk(joined, keep, spaces, seen).eval()
    assert torch.allclose(smaller(x), model(x), atol=1e-6)
    assert smaller.layers[-1].weight.shape == (10, 62)


def test_a_concatenation_is_pruned_at_its_parts_offsets():
    class Concatenation(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 6), nn.Linear(8, 4), nn.Linear(10, 2)

        def forward(self, x):
            return self.c(torch.cat([F.relu(self.a(x)), torch.tanh(self.b(x))], 1))
    torch.manual_seed(0)
    model = Concatenation()
    smaller = pruning.activation_prune(model, torch.rand(16, 8), 0.4)
    a, b, c = (layer for layer in smaller.layers if isinstance(layer, nn.Linear))
    assert c.weight.shape[1] == a.weight.shape[0] + b.weight.shape[0] < 10


class Joined(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.b, self.d, self.c = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        if self.how == "cat along the batch":
            return self.c(torch.cat([self.d(x), self.d(x)], 0))
        return self.c(torch.cat([self.a(x), self.b(x)], 1) + self.d(x))


@pytest.mark.parametrize("how, message", [("cat along the batch", "only along the channels"),
                                          ("sum of different layouts", "channels are laid out differently")])
def test_joins_the_graph_reader_cannot_take_are_refused_in_one_line(how, message):
    with pytest.raises(pruning.NotAChain, match=message) as error:
        pruning.activation_prune(Joined(how), torch.rand(4, 8), 0.5)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_a_residual_network_on_mnist_loses_at_most_a_point_with_half_its_parameters(mnist_dir, tmp_path):
    """On a slice of MNIST; on all of it, with seeds, `python networks.py` (docs/networks.md)."""
    (x, y), (x_test, y_test) = pruning.mnist(mnist_dir)
    train_data, test_data = (x[:8_000].view(-1, 1, 28, 28), y[:8_000]), (x_test[:2_000].view(-1, 1, 28, 28),
                                                                            y_test[:2_000])
    torch.manual_seed(0)
    model = pruning.train(ResNet(), train_data, epochs=1)
    dense = pruning.accuracy(model, test_data)
    finetune = pruning.finetuner(train_data, epochs=1, teacher=model)
    smaller = pruning.activation_prune(model, train_data[0][:2000], 0.5, finetune=finetune)
    assert pruning.count_params(smaller) <= 0.5 * pruning.count_params(model)
    assert pruning.accuracy(smaller, test_data) >= dense - 1, (dense, pruning.accuracy(smaller, test_data))
    pruning.save(smaller, tmp_path / "m.pt")
    assert torch.equal(pruning.logits(pruning.load(tmp_path / "m.pt"), test_data[0]),
                       pruning.logits(smaller, test_data[0]))


def test_a_file_whose_layers_do_not_fit_together_is_refused_before_load_returns(tmp_path):
    model = nn.Sequential(nn.Linear(784, 20), nn.ReLU(), nn.Linear(20, 10))
    pruning.save(model, tmp_path / "m.pt")
    saved = torch.load(tmp_path / "m.pt", weights_only=True)
    saved["architecture"][2]["in"] = 21  # a claim the tensors would also have to fit: checked first
    torch.save(saved, tmp_path / "bad.pt")
    with pytest.raises(pruning.UserError, match=r"do not fit together on an input of shape \(784,\)"):
        pruning.load(tmp_path / "bad.pt")


def test_nested_concatenations_that_would_need_terabytes_are_refused():
    from pruning import architecture
    description = [{"type": "Linear", "in": 4, "out": 4, "bias": True, "reads": [-1]}]
    for k in range(10):  # each node 16 copies of the one before: 4 * 16^10 values
        description.append({"type": "Cat", "reads": [k] * 16})
    with pytest.raises(architecture.BadArchitecture, match="more than 134,217,728 values"):
        architecture.build(description, "meta")


def test_a_sum_of_three_tensors_shrinks_its_channels_together():
    from pruning import graph
    torch.manual_seed(0)
    layers = [nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.Linear(6, 6), graph.Add(), nn.Linear(6, 2)]
    net = graph.Graph(layers, [[-1], [0], [1], [1], [1, 2, 3], [4]])  # as a file of ours may hold it
    small = pruning.activation_prune(net, torch.rand(64, 4), reduction=0.3)
    widths = [m.out_features for m in small.modules() if isinstance(m, nn.Linear)]
    assert widths[0] == widths[1] == widths[2] < 6 and widths[3] == 2


def test_activation_prune_measures_batchnorm_afresh_after_each_cut():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 24 * 24, 10)).eval()
    x = torch.rand(64, 1, 28, 28)
    small = pruning.activation_prune(model, x, reduction=0.4)
    conv, norm = small[2], small[3]
    with torch.no_grad():
        before_norm = conv(small[1](small[0](x)))
    assert torch.allclose(norm.running_mean, before_norm.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(norm.running_var, before_norm.var((0, 2, 3)), rtol=1e-3)
    assert norm.momentum == 0.1 and not small.training


class Attention(nn.Module):
    """Attention over 5 tokens of 8 features and a linear head: self-attention (or the tokens in
    reverse order as keys and values, `cross`), or keys and values of kdim features apart."""

    def __init__(self, kdim=None, cross=False):
        super().__init__()
        self.kdim, self.cross = kdim, cross
        self.attention = nn.MultiheadAttention(8, 2, kdim=kdim, vdim=kdim, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        context = x.flip(1) if self.cross else x
        context = context if self.kdim is None else context.repeat(1, 1, 2)[..., :self.kdim]
        return self.head(self.attention(x, context, context, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("kdim", [None, 6])  # packed in_proj_weight, or q/k/v_proj_weight apart
def test_zero_prune_ranks_attentions_input_projections_with_every_other_weight(kdim):
    torch.manual_seed(0)
    model = Attention(kdim)
    names = [name for _, name in pruning.weight_tensors(model)]
    assert names == (["in_proj_weight"] if kdim is None else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]) \
        + ["weight", "weight"]  # the output projection, then the head
    weights = 3 * 8 * 8 if kdim is None else 8 * 8 + 2 * 8 * kdim
    assert pruning.count_weights(model) == weights + 8 * 8 + 3 * 8
    before = pruning.magnitudes(model)
    pruning.zero_prune(model, 0.5)
    after = pruning.magnitudes(model)
    assert pruning.count_zeros(model) == pruning.count_weights(model) // 2
    assert before[after == 0].max() <= before[after != 0].min()  # the smallest half, over all matrices at once
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())  # no masks left
    assert model(torch.rand(4, 5, 8)).shape == (4, 3)
    with pytest.raises(ValueError, match="nn.MultiheadAttention's input projections: rank by magnitude"):
        pruning.zero_prune(model, 0.6, saliency=lambda m: [])


@pytest.mark.parametrize("kdim", [None, 6])
def test_one_shot_prunes_cross_attention_each_projection_from_what_it_reads(kdim):
    torch.manual_seed(0)
    model, x = Attention(kdim, cross=kdim is None), torch.rand(300, 5, 8)
    pruning.one_shot(model, x, 0.5)
    assert pruning.count_zeros(model) == pytest.approx(pruning.count_weights(model) / 2, abs=1)
    matrices = pruning.weight_tensors(model)
    assert all(0 < (getattr(m, name) == 0).float().mean() < 1 for m, name in matrices)


def test_attention_written_by_hand_is_pruned_layer_by_layer():
    torch.manual_seed(0)

    class SelfAttention(nn.Module):  # as people write it: its projections called as layers
        def __init__(self, width=8, heads=2):
            super().__init__()
            self.heads, self.qkv, self.out = heads, nn.Linear(width, 3 * width), nn.Linear(width, width)
            self.head = nn.Linear(width, 3)

        def forward(self, x):
            n, t, width = x.shape
            q, k, v = (z.view(n, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).split(width, -1))
            y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, width)
            return self.head(self.out(y).mean(1))

    model, x = SelfAttention(), torch.rand(300, 5, 8)
    with torch.no_grad():
        dense = model(x)
    pruning.one_shot(model, x, 0.5)
    assert pruning.count_zeros(model) == pytest.approx(pruning.count_weights(model) / 2, abs=1)
    with torch.no_grad():
        assert (model(x) - dense).abs().max() < dense.abs().max()


def test_the_example_transformer_reads_rows_as_tokens_and_one_shot_takes_every_matrix():
    from networks import RowTransformer
    torch.manual_seed(0)
    model, x = RowTransformer(width=16, heads=2, hidden=32).eval(), torch.rand(64, 1, 28, 28)
    assert model(x).shape == (64, 10)
    pruning.one_shot(model, x, 0.6, pattern=None)
    zeros = [(getattr(m, name) == 0).float().mean().item() for m, name in pruning.weight_tensors(model)]
    assert len(zeros) == 2 + 2 * 4  # the embedding and the head; each layer's in_proj, out_proj, linear1, linear2
    assert pruning.count_zeros(model) == pytest.approx(0.6 * pruning.count_weights(model), abs=2)
    assert all(z > 0 for z in zeros)


class Residual(nn.Module):
    """fc1's four channels, ReLU'd, summed with fc2's: one space, read by fc2 and fc3."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self.fc3(h + self.fc2(h))


def test_group_lasso_on_a_residual_network_groups_each_channel_in_every_layer_that_makes_or_reads_it():
    torch.manual_seed(0)
    model = Residual()
    with torch.no_grad():  # channel 2 gone from every layer: its group's norm 0, its gradient 0 (not NaN)
        for w in (model.fc1.weight[2], model.fc1.bias[2:3], model.fc2.weight[2], model.fc2.weight[:, 2],
                  model.fc2.bias[2:3], model.fc3.weight[:, 2]):
            w.zero_()
    penalty = pruning.group_lasso(model, 0.5, torch.rand(1, 3))
    fc1, fc2, fc3 = model.fc1, model.fc2, model.fc3
    by_hand = sum((fc1.weight[c].square().sum() + fc1.bias[c] ** 2 + fc2.weight[c].square().sum() + fc2.bias[c] ** 2
                   + fc2.weight[:, c].square().sum() + fc3.weight[:, c].square().sum()).sqrt() for c in range(4))
    value = penalty()
    torch.testing.assert_close(value, 0.5 * by_hand)
    value.backward()
    assert torch.isfinite(fc2.weight.grad).all()
    assert fc2.weight.grad[2].abs().sum() == 0 == fc1.weight.grad[2].abs().sum()
    x = torch.rand(8, 3)
    one_channel = (3 + 1) + (4 + 1 + 4 - 1) + 2  # its row in fc1; its row and column in fc2; its column in fc3
    smaller = pruning.activation_prune(model, x, one_channel / pruning.count_params(model) - 1e-6)
    assert smaller.layers[0].out_features == 3  # the channel the penalty emptied is the one cut
    torch.testing.assert_close(smaller(x), model(x))


def test_cuts_by_threshold_and_input_pixels_are_refused_on_a_residual_network_in_one_line_saying_what_cuts_it():
    model, x = Residual(), torch.rand(8, 3)
    before = copy.deepcopy(model.state_dict())
    for call in (lambda: pruning.mean_activations(model, x), lambda: pruning.remove_below(model, [], 0.1)):
        with pytest.raises(pruning.NotAChain, match=r"^add in Residual .* is for chains: cut a network with "
                           r"residual sums .* activation_prune\(model, inputs, reduction, criterion='activation'\)$"):
            call()
    with pytest.raises(pruning.NotAChain, match="^add in Residual .*; prune_inputs is for a chain .*: drop it"):
        pruning.group_lasso(model, 0.5, x[:1], prune_inputs=True)
    with pytest.raises(pruning.NotAChain, match="^add in Residual .*; .* without prune_inputs$"):
        pruning.activation_prune(model, x, 0.3, prune_inputs=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
