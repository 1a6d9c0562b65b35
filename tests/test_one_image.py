"""One image through a model that is one kernel call: straight from the prepared model's call to
the kernel's run_image, and to the model as given (or nn.Module's call) for whatever the short way
does not check for itself."""

import copy
import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn as nn
from test_inference import kernel_of, sparse_mlp

import pruning
from pruning import columns, kernels, packing, plans
from pruning.model import KeepInputs, Normalize


def one_call(model, inputs=40, loose=True):
    """The model prepared as one kernel call of its non-zeros, read from inputs of its first layer's
    size in any shape (loose), as for_inference prepares a model that reshapes its input."""
    return plans.Prepared(nn.Sequential(), [kernel_of(model, False, 16, 1)], (inputs,), loose, model,
                          ["sparse"] * 3)


def counted(fast):
    """fast, its kernel's one-image calls counted in the list it returns beside it."""
    calls, image = [], fast.steps[0].image
    fast.steps[0].image = lambda x: calls.append(tuple(x.shape)) or image(x)
    return fast, calls


def test_one_image_of_any_shape_of_its_size_goes_straight_to_the_kernel():
    model = sparse_mlp()
    fast, calls = counted(one_call(model))
    x = torch.randn(1, 40)
    with torch.no_grad():
        expected = model(x)
    for shaped in (x, x.view(1, 1, 40), x.view(1, 5, 8), x.view(1, 5, 8)):
        got = fast(shaped)
        assert got.shape == (1, 6) and got.dtype is torch.float32 and torch.allclose(got, expected, atol=1e-6)
    assert calls == [(1, 40), (1, 1, 40), (1, 5, 8), (1, 5, 8)]
    assert (1, 5, 8) in fast.images  # remembered: the set lookup, not the size check, the next time
    assert fast(x).data_ptr() != fast(x).data_ptr()  # each answer its own tensor


def test_what_the_short_way_does_not_take_goes_the_long_way_with_the_same_answer():
    model = sparse_mlp()
    fast, calls = counted(one_call(model))
    x = torch.randn(1, 80)[:, ::2]  # not contiguous
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(fast(x), expected, atol=1e-6)
    assert fast(x.contiguous().requires_grad_()).grad_fn is not None
    assert torch.allclose(fast(x.to_sparse()), expected, atol=1e-6)  # which nn.Linear takes (the layout was
    # not checked before: is_contiguous raised)
    assert torch.allclose(fast(torch.stack([x[0], x[0]])), torch.cat([expected, expected]), atol=1e-6)
    strict, strict_calls = counted(one_call(model, loose=False))
    assert torch.allclose(strict(x.contiguous()), expected, atol=1e-6) and strict_calls == [(1, 40)]
    with pytest.raises(RuntimeError, match="cannot be multiplied"):  # the model as given, and its own error
        strict(x.contiguous().view(1, 5, 8))
    assert calls == [] and strict_calls == [(1, 40)]


def test_a_hook_added_after_planning_anywhere_runs():
    model = sparse_mlp()
    x = torch.randn(1, 40)
    for add, own in ((lambda fast: fast.register_forward_hook(lambda m, i, out: out + 1), True),
                     (lambda fast: fast.layers[0].register_forward_hook(lambda m, i, out: out + 1), False),
                     (lambda fast: nn.modules.module.register_module_forward_hook(  # on every module called: the
                         lambda m, i, out: out + 1 if isinstance(m, plans.Prepared) else None), True)):  # model
        for fast in (one_call(model), copy.deepcopy(one_call(model)), pickle.loads(pickle.dumps(one_call(model)))):
            fast, calls = counted(fast)
            before = fast(x)
            handle = add(fast)
            try:
                after = fast(x)
                with torch.no_grad():
                    want = fast.given[0](x) + own  # the model as given, whose layers the prepared model's are
            finally:
                handle.remove()
            assert not torch.allclose(after, before) and torch.allclose(after, want, atol=1e-6) and len(calls) == 1
            assert torch.equal(fast(x), before) and len(calls) == 2  # the short way again, once it is removed


def test_one_image_at_a_time_from_several_threads_each_get_their_own_answer():
    model = sparse_mlp((40, 23, 37))
    fast = one_call(model)
    inputs = [torch.randn(1, 40) for _ in range(8)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    with ThreadPoolExecutor(len(inputs)) as pool:  # run_image keeps the GIL: one thread in its buffers at a time
        answers = list(pool.map(lambda x: [fast(x) for _ in range(300)], inputs))
    for got, want in zip(answers, expected):
        assert all(torch.allclose(g, want, rtol=1e-5, atol=1e-5) for g in got)


def test_a_python_without_a_gil_takes_one_image_under_the_lock(monkeypatch):
    model = sparse_mlp((40, 23, 37))
    kernel = kernel_of(model, False, 16, 1)
    x = torch.randn(1, 40)
    with torch.no_grad():
        expected = model(x)
    monkeypatch.setattr(packing, "GIL", False)
    assert torch.allclose(kernel.image(x), expected, atol=1e-5)
    with kernel.scratch_free:  # the buffers busy: the call takes a tile's buffers of its own
        assert torch.allclose(kernel(x), expected, atol=1e-5)
    assert torch.allclose(kernel(x), expected, atol=1e-5)


def test_run_image_is_given_the_model_in_the_order_the_kernel_reads_it():
    kernel = kernel_of(sparse_mlp(), False, 16, 1)
    fields = dict(zip(kernels.IMAGE, kernel.image_arguments.tolist()))
    assert fields == {"plan": kernel.plan.ctypes.data, "scales": kernel.scales.ctypes.data, "inputs": 40,
                      "one": kernel.one_at, "two": kernel.one_at + 4 * kernel.width}
    assert kernel.one_at % 64 == 0 and kernel.one_at + 4 * kernel.width * kernel.buffers <= (
        kernel.one.data_ptr() + 4 * kernel.one.numel())
    assert np.array_equal(kernel.image_arguments, copy.deepcopy(kernel).image_arguments) is False  # its own arrays


def test_a_first_layer_as_columns_by_hand():
    lengths, index = np.array([2, 0, 1]), np.array([0, 2, 2])  # rows: {0: w 2, 2: w 4}, {}, {2: w 8}
    values, bias = np.array([2.0, 4.0, 8.0], np.float32), np.array([1.0, 0.0, 0.5], np.float32)
    pointers, rows, scaled, folded = columns.columns_of(lengths, index, values, bias, 4, 0.25, 2.0)
    assert pointers.tolist() == [0, 1, 1, 3, 3] and rows.tolist() == [0, 0, 2] and scaled.tolist() == [4, 8, 16]
    assert folded.tolist() == [1.0 - 0.25 * 12, 0.0, 0.5 - 0.25 * 16]  # bias - shift * inverse * the row's sum


def test_the_input_a_first_layer_by_columns_skips_is_read_by_no_other_layer():
    assert not packing.input_read_again([(0, 1, 0, -1), (1, 0, 0, -1), (0, 1, 0, -1)])  # a chain
    assert packing.input_read_again([(0, 1, 0, -1), (1, 2, 0, 0)])  # the input added into a later layer
    assert packing.input_read_again([(0, 1, 0, -1), (1, 2, 0, -1), (0, 1, 0, -1)])  # read again
    assert not packing.input_read_again([(0, 1, 0, -1), (1, 0, 0, -1), (0, 2, 0, -1)])  # written first


def mostly_blank(count, inputs=40, lit=0.2, seed=0):
    """count inputs with about `lit` of their values not zero (as an MNIST image's pixels), a -0.0 among them."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(count, inputs, generator=generator) * (torch.rand(count, inputs, generator=generator) < lit)
    x[:, 1] = -0.0
    return x


def test_one_image_with_few_inputs_lit_is_taken_by_columns_and_one_with_many_by_rows():
    model = nn.Sequential(Normalize(0.25, 0.5, shape=(40,)), *sparse_mlp())
    kernel = packing.KernelLayers(plans.split(pruning.chain.layers(model))[1], [False] * 3, 40, shift=0.25, scale=0.5)
    fast = plans.Prepared(nn.Sequential(), [kernel], (40,), True, model, ["sparse"] * 3)
    assert kernel.by_columns == 2 and kernel.buffers == 3 and kernel.width >= 40
    assert "one image's first layer by the columns" in fast.summary  # and not where it is stored whole:
    assert "by the columns" not in plans.Prepared(nn.Sequential(), [kernel_of(model[1:], True, 16, 1)], (40,), True,
                                                  model, ["rows"] * 3).summary
    blank, lit = mostly_blank(30), torch.rand(30, 40) + 0.1
    half = mostly_blank(2, lit=1.0) * (torch.arange(40) < 20)  # 20 of 40 lit: at COLUMNS_BELOW, by columns
    x = torch.cat([blank, lit, half, half + 1])
    with torch.no_grad():
        expected = model(x)
    got = torch.cat([fast(row[None]) for row in x])
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    kernel.column_values[:] = 0  # the columns' weights gone: only what is taken by columns changes
    got = torch.cat([fast(row[None]) for row in x])
    changed = (got - expected).abs().amax(1) > 1e-4
    assert changed[:30].all() and not changed[30:60].any() and changed[60:62].all() and not changed[62:].any()
    assert torch.allclose(kernel(x), expected, rtol=1e-5, atol=1e-5)  # a batch: rows, in tiles


def test_one_image_by_columns_reads_only_the_inputs_its_first_layer_reads_and_keeps_nans():
    kept = torch.tensor([3, 5, 8, 13, 21, 34, 39])
    model = nn.Sequential(KeepInputs(kept, size=40), *sparse_mlp((7, 9, 4)))
    kernel = packing.KernelLayers(plans.split(pruning.chain.layers(model))[1], [False] * 2, 40, kept.numpy(),
                                  checked=kept.numpy())  # as for_inference makes it
    fast = plans.Prepared(nn.Sequential(), [kernel], (40,), True, model, ["sparse"] * 3)
    assert kernel.by_columns == 2
    x = mostly_blank(50, lit=0.1)
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(torch.cat([fast(row[None]) for row in x]), expected, rtol=1e-5, atol=1e-5)
    x[:, 0] = float("nan")  # read by no layer: no NaN
    assert torch.allclose(fast(x[:1]), expected[:1], rtol=1e-5, atol=1e-5)
    for poisoned in (float("nan"), float("inf")):
        x[0, 5] = poisoned
        assert fast(x[:1]).isnan().all()  # as a dense layer gives
