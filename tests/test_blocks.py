"""Transformer blocks cut from the inside (pruning/blocks.py) and the attention whose heads can go
(pruning/attention.py): the same outputs as nn.MultiheadAttention, and heads and feed-forward
units that pass nothing on removed first, leaving the outputs as they were."""

import copy

import pytest
import torch
import torch.nn as nn

import pruning
from pruning import blocks
from pruning.attention import Attention, from_multihead


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 12])
@pytest.mark.parametrize("bias", [True, False])
def test_attention_computes_what_multihead_attention_does(batch_first, kdim, bias):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias).eval()
    attention = from_multihead(mha)
    q, kv = torch.randn(3, 5, 16), torch.randn(3, 7, kdim or 16)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, -2:] = True
    hidden = torch.zeros(5, 7, dtype=torch.bool)
    hidden[:, 0] = True
    for masks in ({}, {"key_padding_mask": padding}, {"attn_mask": hidden, "key_padding_mask": padding},
                  {"attn_mask": torch.randn(5, 7)}):
        for need_weights in (True, False):
            expected, expected_weights = mha(q, kv, kv, need_weights=need_weights, **masks)
            out, weights = attention(q, kv, kv, need_weights=need_weights, **masks)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
            if need_weights:
                torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)
            else:
                assert weights is None and expected_weights is None
    x = torch.randn(5, 16)  # one sequence, unbatched
    if kdim is None:
        torch.testing.assert_close(attention(x, x, x)[0], mha(x, x, x)[0], atol=1e-5, rtol=1e-5)


def test_add_bias_kv_is_refused():
    with pytest.raises(ValueError, match="add_bias_kv"):
        from_multihead(nn.MultiheadAttention(8, 2, add_bias_kv=True))


class Encoder(nn.Module):
    """Tokens of 8 features through two encoder layers (2 heads of 4, 6 hidden units each)."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 6, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.encoder(x).mean(1))


def idle_units(model):
    """model with the second head of every attention and the last three feed-forward units of every
    layer passing nothing on (their output projection's columns zero)."""
    with torch.no_grad():
        for layer in model.encoder.layers:
            layer.self_attn.out_proj.weight[:, 4:] = 0
            layer.linear2.weight[:, 3:] = 0
    return model


def test_the_units_that_pass_nothing_on_go_first_and_the_outputs_stay():
    torch.manual_seed(0)
    model = idle_units(Encoder()).eval()
    x = torch.randn(10, 5, 8)
    before = copy.deepcopy(model.state_dict())
    per_layer = 3 * (8 * 4 + 4) + 4 * 8 + 3 * (8 + 1 + 8)  # one head of 4 features, three hidden units
    reduction = 2 * per_layer / pruning.count_params(model)
    pruned = pruning.activation_prune(model, x, reduction)
    assert type(pruned) is Encoder and pruning.count_params(pruned) == pruning.count_params(model) - 2 * per_layer
    for layer in pruned.encoder.layers:
        attention = layer.self_attn
        assert isinstance(attention, Attention) and attention.num_heads == 1 and attention.q_proj.out_features == 4
        assert attention.out_proj.in_features == 4 and layer.linear1.out_features == 3 == layer.linear2.in_features
    torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model as it was


def test_activation_criterion_ranks_by_the_mean_activation_over_every_token():
    torch.manual_seed(0)
    model = blocks.with_attention(Encoder().eval())
    x = torch.randn(10, 5, 8)
    groups = blocks.groups_of(model)
    seen = {}
    first = model.encoder.layers[0]
    first.linear2.register_forward_pre_hook(lambda m, a: seen.setdefault("units", a[0]))
    first.self_attn.out_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("heads", a[0]))
    strengths = blocks.strengths(model, groups, x, "activation")
    assert [g.owner for g in groups[:2]] == [first, first.self_attn] and len(groups) == 4
    torch.testing.assert_close(strengths[0], seen["units"].abs().mean((0, 1)))
    torch.testing.assert_close(strengths[1], seen["heads"].abs().mean((0, 1)).view(2, 4).sum(1))


def test_steps_keep_the_mode_and_fine_tune_after_each():
    torch.manual_seed(0)
    model = Encoder().train()
    calls = []
    pruned = pruning.activation_prune(model, torch.randn(10, 5, 8), 0.4, steps=2, finetune=calls.append)
    assert len(calls) == 2 and pruned.training and pruning.count_params(pruned) <= 0.6 * pruning.count_params(model)


def test_what_does_not_carry_over_is_refused_in_one_line():
    model = Encoder()
    with pytest.raises(ValueError, match="prune_inputs"):
        pruning.activation_prune(model, torch.randn(4, 5, 8), 0.5, prune_inputs=True)
    with pytest.raises(ValueError, match="'activation' or 'contribution'"):
        pruning.activation_prune(model, torch.randn(4, 5, 8), 0.5, criterion=lambda *a: None)


@pytest.mark.filterwarnings("ignore:.*non-zeros as CSR")
def test_a_pruned_transformer_saves_and_loads_as_data(tmp_path):
    torch.manual_seed(0)
    model = Encoder().eval()
    x = torch.randn(6, 5, 8)
    pruned = pruning.zero_prune(pruning.activation_prune(model, x, 0.4), 0.5)
    for net in (model, pruned):
        for storage in ("dense", "csr"):
            pruning.save(net, tmp_path / "m.pt", storage)
            loaded = pruning.load(tmp_path / "m.pt")
            assert torch.equal(loaded(x), net(x))
        pruning.save(net, tmp_path / "m.bin", "compressed")
        quantized = pruning.load(tmp_path / "m.bin")
        assert (quantized(x) - net(x)).abs().max() < 0.1  # 5-bit shared weights: close, not equal
    layers = [m for m in loaded.modules() if isinstance(m, nn.TransformerEncoderLayer)]
    assert len(layers) == 2 and all(isinstance(m.self_attn, Attention) for m in layers)


def test_a_transformer_file_claiming_what_cannot_be_is_refused(tmp_path):
    from pruning import architecture
    description = architecture.describe(pruning.graph.of(Encoder()))
    layer = next(d for d in description if d["type"] == "TransformerEncoderLayer")
    for key, value in (("heads", 3), ("activation", "swish"), ("width", 0), ("packed", "yes")):
        wrong = [dict(d, **{key: value}) if d is layer else d for d in description]
        with pytest.raises(architecture.BadArchitecture):
            architecture.build(wrong, "meta")
    huge = [dict(d, width=1 << 24, hidden=1 << 24) if d is layer else d for d in description]
    with pytest.raises(architecture.BadArchitecture, match="parameters"):
        architecture.build(huge, "meta")


class SequenceFirst(nn.Module):
    """An image's rows as tokens, written as people write it: a reshape, a learned position, the tokens
    first (batch_first=False, GELU, norm first, a final LayerNorm), the first token as the summary."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.position = nn.Parameter(torch.randn(5, 1, 8))
        layer = nn.TransformerEncoderLayer(8, 2, 6, dropout=0.0, activation="gelu", norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8), enable_nested_tensor=False)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x.view(-1, 5, 6)).permute(1, 0, 2) + self.position
        return self.fc(self.encoder(x).transpose(0, 1)[:, 0])


def written_another_way(tmp_path):
    """SequenceFirst cut by activation_prune, saved and loaded: (its input, the pruned, the loaded)."""
    torch.manual_seed(0)
    model = SequenceFirst().eval()
    x = torch.randn(7, 1, 5, 6)
    pruned = pruning.activation_prune(model, x, 0.3)
    pruning.save(pruned, tmp_path / "m.pt")
    return x, pruned, pruning.load(tmp_path / "m.pt")


def test_a_transformer_written_another_way_round_trips_through_its_files(tmp_path):
    x, pruned, loaded = written_another_way(tmp_path)
    fast = pruning.for_inference(loaded, 7, example=x)  # a graph with a learned tensor that reads nothing
    assert torch.equal(fast(x).argmax(1), pruned(x).argmax(1))
    kinds = [type(m).__name__ for m in pruning.graph.of(pruned).layers]
    assert kinds == ["Reshape", "Linear", "Permute", "Tensor", "Add", "TransformerEncoderLayer",
                     "TransformerEncoderLayer", "LayerNorm", "Permute", "Token", "Linear"]
    assert torch.equal(loaded(x), pruned(x))


@pytest.mark.slow  # seconds of torch.onnx's exporter
def test_a_transformer_written_another_way_exports_to_onnx(tmp_path):
    import onnxruntime
    x, _, loaded = written_another_way(tmp_path)
    pruning.export_onnx(loaded, tmp_path / "m.onnx", example=x[:2])
    out = onnxruntime.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"images": x.numpy()})[0]
    assert abs(out - loaded(x).detach().numpy()).max() < 1e-5  # another batch size than the example's


def test_what_a_file_cannot_describe_is_refused_in_one_line(tmp_path):
    class Prepended(SequenceFirst):
        def forward(self, x):
            x = self.embed(x.view(-1, 5, 6))
            return self.fc(self.encoder(torch.cat([x[:, :1].expand(-1, 2, -1), x], 1))[:, 0])
    with pytest.raises(pruning.NotAChain, match=r"^getitem in Prepended is not a layer"):
        pruning.save(Prepended(), tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()
