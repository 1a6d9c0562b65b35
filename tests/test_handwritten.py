"""Attention written by hand around F.scaled_dot_product_attention (pruning/handwritten.py): read as
an attention.SelfAttention with the same outputs, its heads and its block's feed-forward units
removed by activation_prune, and the model saved, loaded and exported; what it cannot read is
refused in one line, the model unchanged."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pruning
from pruning import blocks, handwritten
from pruning.attention import SelfAttention


class Packed(nn.Module):
    """nanoGPT's CausalSelfAttention: one projection makes the query, key and value."""

    def __init__(self, width=8, heads=2, bias=True):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(width, 3 * width, bias=bias)
        self.c_proj = nn.Linear(width, width, bias=bias)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Separate(nn.Module):
    """Three projections, declared value first: which is the query is seen from the outputs."""

    def __init__(self, width=8, heads=4, head_dim=3):
        super().__init__()
        self.heads = heads
        self.value, self.query, self.key = (nn.Linear(width, heads * head_dim, bias=False) for _ in range(3))
        self.out = nn.Linear(heads * head_dim, width, bias=False)

    def split(self, t):
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x):
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc, self.act, self.proj = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    def __init__(self, attention, feed_forward):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = nn.LayerNorm(8), attention, nn.LayerNorm(8), feed_forward

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Net(nn.Module):
    """Tokens of 8 features through two blocks written by hand, the tokens averaged, a head."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Block(Packed(), nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 8))),
                                    Block(Separate(), FeedForward(8, 6)))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.blocks(x).mean(1))


class CausalBuffer(Packed):
    """Older nanoGPT: the causal mask a buffer, as bool or as 0 and -inf, not is_causal."""

    def __init__(self, additive=False):
        super().__init__()
        allowed = torch.ones(16, 16, dtype=torch.bool).tril()
        self.register_buffer("bias", torch.zeros(16, 16).masked_fill(~allowed, float("-inf")) if additive else
                             allowed.view(1, 1, 16, 16))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        mask = self.bias[..., :T, :T]
        return self.c_proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2))


@pytest.mark.parametrize("make, heads, head_dim, causal", [(Packed, 2, 4, True), (Separate, 4, 3, False),
                                                            (lambda: Packed(bias=False), 2, 4, True),
                                                            (CausalBuffer, 2, 4, True),
                                                            (lambda: CausalBuffer(additive=True), 2, 4, True)])
def test_attention_written_by_hand_is_read_as_self_attention_with_the_same_outputs(make, heads, head_dim, causal):
    torch.manual_seed(0)
    written = make().eval()
    attention = handwritten.recognised(written, "attn")
    assert type(attention) is SelfAttention and not attention.training
    assert (attention.num_heads, attention.head_dim, attention.causal) == (heads, head_dim, causal)
    x = torch.randn(3, 7, 8)  # more tokens than the probe's
    torch.testing.assert_close(attention(x), written(x), atol=1e-6, rtol=1e-6)


class Masked(Packed):
    def forward(self, x):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        mask = torch.ones(T, T, dtype=torch.bool).tril(-1)
        return self.c_proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2))


class Scaled(Packed):
    def forward(self, x):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        return self.c_proj(F.scaled_dot_product_attention(2 * q, k, v).transpose(1, 2).flatten(2))


class WithWeights(Packed):
    """Returns its output and None, as nn.MultiheadAttention returns its weights."""

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        return self.c_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)), None


class Holder(nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.attn, self.fc = attention, nn.Linear(8, 3)

    def forward(self, x):
        y = self.attn(x)
        return self.fc((y[0] if isinstance(y, tuple) else y).mean(1))


@pytest.mark.parametrize("make, message", [(Masked, "no mask \\(but a causal one\\) or scale of its own"),
                                           (Scaled, "no arrangement of its projections"),
                                           (WithWeights, "does not run on one tensor")])
def test_attention_computed_otherwise_is_refused_in_one_line_and_the_model_kept(make, message, tmp_path):
    torch.manual_seed(0)
    model = Holder(make())
    before = copy.deepcopy(model.state_dict())
    for call in (lambda: pruning.save(model, tmp_path / "m.pt"),
                 lambda: pruning.activation_prune(model, torch.randn(4, 5, 8), 0.3)):
        with pytest.raises(pruning.NotAChain, match=f"^attn \\({make.__name__}\\).*{message}") as refused:
            call()
        assert "\n" not in str(refused.value)
    assert not (tmp_path / "m.pt").exists() and type(model.attn) is make
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def idle_units(model):
    """model with the last half of every attention's heads and of every feed-forward layer's units
    passing nothing on (their columns of the output projections zero)."""
    with torch.no_grad():
        model.blocks[0].attn.c_proj.weight[:, 4:] = 0
        model.blocks[1].attn.out.weight[:, 6:] = 0
        model.blocks[0].mlp[2].weight[:, 3:] = 0
        model.blocks[1].mlp.proj.weight[:, 3:] = 0
    return model


def test_idle_heads_and_feed_forward_units_of_a_transformer_written_by_hand_go_first_and_the_outputs_stay():
    torch.manual_seed(0)
    model = idle_units(Net()).eval()
    x = torch.randn(10, 5, 8)
    before = copy.deepcopy(model.state_dict())
    groups = blocks.groups_of(blocks.with_attention(copy.deepcopy(model)))
    assert sorted((g.count(), g.size) for g in groups) == [(2, 4), (4, 3), (6, 1), (6, 1)]
    # every group cut by one fraction, to half: a head of 4 features, one of 3 and 2 of them, 3 units each
    removed = (3 * (8 * 4 + 4) + 8 * 4) + (3 * 8 * 6 + 8 * 6) + 2 * 3 * (8 + 1 + 8)
    pruned = pruning.activation_prune(model, x, removed / pruning.count_params(model) - 1e-6)
    assert type(pruned) is Net and pruning.count_params(pruned) == pruning.count_params(model) - removed
    assert [b.attn.num_heads for b in pruned.blocks] == [1, 2]
    assert pruned.blocks[0].mlp[0].out_features == 3 == pruned.blocks[1].mlp.fc.out_features
    torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=1e-5)  # only idle heads and units went
    assert type(model.blocks[0].attn) is Packed  # the model as it was
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.filterwarnings("ignore:.*non-zeros as CSR")
def test_a_transformer_written_by_hand_saves_and_loads_as_data_pruned_every_way(tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(6, 5, 8)
    smaller = pruning.activation_prune(model, x, 0.4)
    one_shot = pruning.one_shot(copy.deepcopy(model), torch.randn(64, 5, 8), 0.5)
    assert pruning.count_zeros(one_shot) >= 0.45 * pruning.count_weights(one_shot)
    for net in (model, smaller, pruning.zero_prune(copy.deepcopy(smaller), 0.5), one_shot):
        pruning.save(net, tmp_path / "m.pt", "csr")
        loaded = pruning.load(tmp_path / "m.pt")
        assert torch.equal(loaded(x), net(x))
    assert sum(isinstance(m, SelfAttention) for m in loaded.modules()) == 2


@pytest.mark.slow  # seconds of torch.onnx's exporter
def test_a_transformer_written_by_hand_exports_to_onnx_and_runs_through_for_inference(tmp_path):
    import onnxruntime
    torch.manual_seed(0)
    model = pruning.activation_prune(Net().eval(), torch.randn(8, 5, 8), 0.3)
    x = torch.randn(6, 5, 8)
    pruning.export_onnx(model, tmp_path / "m.onnx", example=x[:2])
    out = onnxruntime.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"images": x.numpy()})[0]
    assert abs(out - model(x).detach().numpy()).max() < 1e-5
    assert torch.equal(pruning.for_inference(model, example=x[:2])(x).argmax(1), model(x).argmax(1))


def test_group_lasso_refuses_a_transformer_in_one_line_saying_what_removes_its_units():
    with pytest.raises(pruning.NotAChain, match="^Net holds attention: .* with activation_prune$"):
        pruning.group_lasso(Net(), 0.1, torch.randn(1, 5, 8))
