"""Attention written by hand: a module whose own forward makes heads from its nn.Linear projections
and calls F.scaled_dot_product_attention on them (nanoGPT's CausalSelfAttention, say), replaced
by an attention.SelfAttention with the same weights and the same outputs, so that its heads can
be removed, and the model saved and exported, as with nn.MultiheadAttention. The module is run
once, in float64, on random tokens: the call shows its heads, their size and whether it is causal;
each way its projections can be the query, key and value is then tried, and the one that gives
the module's own outputs kept. A module that matches none is refused in one line naming it."""

import copy
import inspect
import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from pruning.attention import Attention, SelfAttention
from pruning.chain import NotAChain

TOKENS = 5  # the probe's tokens: within any causal mask a module keeps for its longest sequence


class NotRecognised(NotAChain):
    """A module calls F.scaled_dot_product_attention in a way SelfAttention does not compute."""


def calls_attention(module: nn.Module) -> bool:
    """Whether module's own forward (not only a child's) calls F.scaled_dot_product_attention."""
    if isinstance(module, (Attention, SelfAttention, nn.MultiheadAttention)) or type(module).__module__.startswith(
            "torch."):
        return False
    try:
        return "scaled_dot_product_attention" in inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False


def with_self_attention(model: nn.Module) -> nn.Module:
    """model itself where none of its modules is attention written by hand; else a copy of it in
    which every such module is a SelfAttention computing what it computed."""
    names = [name for name, m in model.named_modules() if calls_attention(m)]
    return replaced(copy.deepcopy(model), names) if names else model


def replaced(model: nn.Module, names: list[str] | None = None) -> nn.Module:
    """model (changed in place) with each of its modules named (by default every one that calls
    attention) a SelfAttention computing what that module computed."""
    if names is None:
        names = [name for name, m in model.named_modules() if calls_attention(m)]
    if "" in names:
        raise NotRecognised(f"{type(model).__name__}'s own forward calls scaled_dot_product_attention: "
                            "give its attention a module of its own")
    done = []
    for name in names:
        if any(name.startswith(f"{outer}.") for outer in done):
            continue  # inside attention already replaced
        done.append(name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, recognised(model.get_submodule(name), name))
    return model


class Seen(TorchFunctionMode):
    """The arguments of every F.scaled_dot_product_attention call made while it is on."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
            self.calls.append({**dict(zip(names, args)), **kwargs})
        return func(*args, **kwargs)


@torch.no_grad()
def probe(module, width, device):
    """(module's output on random tokens of `width` features, those tokens, the attention calls
    seen, the projections in the order it ran them), module run in float64 and eval mode; None
    where it does not run on such tokens."""
    order, hooks = [], [m.register_forward_hook(lambda m, i, o: order.append(m))
                        for m in module.modules() if isinstance(m, nn.Linear)]
    x = torch.randn(2, TOKENS, width, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        with Seen() as seen:
            out = module(x)
    except Exception:
        return None
    finally:
        for h in hooks:
            h.remove()
    return (out, x, seen.calls, order) if isinstance(out, torch.Tensor) and out.shape == x.shape else None


@torch.no_grad()
def recognised(module: nn.Module, name: str) -> SelfAttention:
    """The SelfAttention that computes what module computes, in module's dtype, device and mode."""
    where = f"{name} ({type(module).__name__})"
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise NotRecognised(f"{where} calls scaled_dot_product_attention with no nn.Linear projections")
    reference = copy.deepcopy(module).double().eval()
    originals = dict(zip([m for m in reference.modules() if isinstance(m, nn.Linear)], linears))
    for width in dict.fromkeys(m.in_features for m in linears):
        seen = probe(reference, width, linears[0].weight.device)
        if seen is not None:
            break
    else:
        raise NotRecognised(f"{where} calls scaled_dot_product_attention but does not run on one tensor of "
                            "(batch, tokens, features) alone: write it as nn.MultiheadAttention")
    out, x, calls, order = seen
    ran = [originals[m] for m in order]
    call = calls[0] if len(calls) == 1 else None
    causal = call is not None and (bool(call.get("is_causal", False)) or is_causal_mask(call.get("attn_mask")))
    if call is None or call.get("attn_mask") is not None and not causal or call.get("scale") is not None or call.get(
            "enable_gqa") or call["query"].shape != call["key"].shape or call["key"].shape != call["value"].shape:
        raise NotRecognised(f"{where} calls scaled_dot_product_attention other than once, on heads of one "
                            "size, with no mask (but a causal one) or scale of its own: write it as "
                            "nn.MultiheadAttention")
    heads, head_dim = call["query"].shape[1], call["query"].shape[-1]
    for attention in candidates(ran, width, heads, head_dim, causal):
        if torch.allclose(attention.double().eval()(x), out, rtol=1e-9, atol=1e-9):
            parameter = linears[0].weight
            return attention.to(parameter.device, parameter.dtype).train(module.training)
    raise NotRecognised(f"{where}: no arrangement of its projections as query, key, value and output gives "
                        "its outputs: write it as nn.MultiheadAttention")


def is_causal_mask(mask):
    """Whether mask lets each of the probe's tokens attend to those up to its own alone (True where
    attended, or 0 there and -inf elsewhere), as is_causal would: a causal mask kept as a buffer."""
    if not isinstance(mask, torch.Tensor) or mask.dim() < 2 or mask.shape[-2:] != (TOKENS, TOKENS):
        return False
    allowed = torch.ones(TOKENS, TOKENS, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return bool((mask == allowed).all())
    below, above = mask.masked_fill(~allowed, 0), mask.masked_fill(allowed, -math.inf)
    return bool((below == 0).all() and torch.isneginf(above).all())


def candidates(ran, width, heads, head_dim, causal):
    """Each SelfAttention that the projections run (the packed query-key-value one or three, then
    the output one) could make, the query, key and value taken in every order."""
    inner = heads * head_dim
    *inputs, output = ran
    if len(set(ran)) != len(ran) or output.in_features != inner or output.out_features != width or len(
            {m.bias is not None for m in ran}) != 1:
        return
    if len(inputs) == 1 and inputs[0].out_features == 3 * inner:
        weights = inputs[0].weight.chunk(3)
        biases = inputs[0].bias.chunk(3) if inputs[0].bias is not None else (None,) * 3
    elif len(inputs) == 3 and all(m.out_features == inner and m.in_features == width for m in inputs):
        weights, biases = [m.weight for m in inputs], [m.bias for m in inputs]
    else:
        return
    for order in itertools.permutations(range(3)):
        attention = SelfAttention(width, heads=heads, head_dim=head_dim, bias=output.bias is not None,
                                  causal=causal, packed=len(inputs) == 1).to(output.weight.dtype)
        rows = torch.cat([weights[k] for k in order])
        for proj, weight in zip(attention.projections(), rows.split(len(rows) // len(attention.projections()))):
            proj.weight.copy_(weight)
        if output.bias is not None:
            for proj, bias in zip(attention.projections(), torch.cat([biases[k] for k in order]).split(
                    len(rows) // len(attention.projections()))):
                proj.bias.copy_(bias)
            attention.out_proj.bias.copy_(output.bias)
        attention.out_proj.weight.copy_(output.weight)
        yield attention
