"""pruning.for_inference: the same predictions, whichever way each layer runs; the kernel's paths
(one image, tiles, four rows at a time, threads) checked against PyTorch on small models."""

import copy
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_pruning import tiny
from torch.nn.utils import prune

import pruning
from pruning import inference, kernels, lowering, packing, plans, surgery
from pruning import model as models
from pruning.formats import compressed


def sparse_mlp(sizes=(40, 23, 13, 6), density=0.3, seed=0):
    """An MLP of odd widths (no multiple of four) with about `density` of its weights non-zero."""
    torch.manual_seed(seed)
    model = models.mlp(sizes)
    with torch.no_grad():
        for layer in models.linears(model):
            layer.weight.mul_(torch.rand_like(layer.weight) < density)
    return model.eval()


def kernel_of(model, dense, tile, threads, columns=None):
    """KernelLayers running every layer of an MLP, each stored as `dense` says."""
    _, run = plans.split(pruning.chain.layers(model))
    kernel = packing.KernelLayers(run, [dense] * len(run), run[0][0].in_features, columns)
    kernel.tile, kernel.threads = tile, threads
    return kernel


def test_a_layer_is_stored_as_the_kernel_reads_it():
    weight = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 3.0]])
    lengths, index, values = packing.stored_rows(weight, False, None)
    assert lengths.tolist() == [1, 0, 2] and index.tolist() == [1, 0, 2] and values.tolist() == [2.0, 1.0, 3.0]
    lengths, index, values = packing.stored_rows(weight, True, np.array([0, 2]))  # every weight of columns 0, 2
    assert lengths.tolist() == [2, 2, 2] and index.tolist() == [0, 1] * 3 and values.tolist() == [0, 0, 0, 0, 1, 3]


def test_plans_of_one_model_store_each_layer_once():
    model, packed = sparse_mlp(), {}
    _, run = plans.split(pruning.chain.layers(model))
    first = packing.KernelLayers(run, [False] * 3, 40, packed=packed)
    second = packing.KernelLayers(run[:2], [False] * 2, 40, packed=packed)
    assert len(packed) == 3 and np.array_equal(first.data[:len(second.data)], second.data)


def test_the_kernel_by_hand():
    model = tiny([2, 2, 1], [[[1.0, 0.0], [0.0, 2.0]], [[1.0, 3.0]]], [[0.5, 0.0], [0.25]])
    x = torch.tensor([[1.0, -1.0], [1.0, 1.0]])  # relu([1.5, -2]) -> 1.75; relu([1.5, 2]) -> 7.75
    for dense in (False, True):
        assert kernel_of(model, dense, 1, 1)(x[:1]).tolist() == [[1.75]]
        assert kernel_of(model, dense, 16, 1)(x).tolist() == [[1.75], [7.75]]


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("batch,tile,threads", [(1, 1, 1), (7, 16, 1), (37, 16, 2), (64, 16, 1), (64, 32, 2),
                                                (130, 64, 2)])
@pytest.mark.parametrize("sizes", [(40, 23, 13, 6), (40, 23, 37)])  # outputs past 16 leave the tile 16 by 16
def test_the_kernel_computes_what_pytorch_does(dense, batch, tile, threads, sizes):
    model = sparse_mlp(sizes)
    x = torch.randn(batch, 40)
    with torch.no_grad():
        expected = model(x)
    got = kernel_of(model, dense, tile, threads)(x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_calls_from_several_threads_at_once_each_get_their_own_answer():
    model = sparse_mlp((40, 23, 37))
    kernel = kernel_of(model, False, 16, 1)
    inputs = [torch.randn(batch, 40) for batch in (1, 1, 20, 20)] * 2
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    with ThreadPoolExecutor(len(inputs)) as pool:  # calls that find the kept buffers busy take their own
        answers = list(pool.map(lambda x: [kernel(x) for _ in range(50)], inputs))
    for got, want in zip(answers, expected):
        assert all(torch.allclose(g, want, rtol=1e-5, atol=1e-5) for g in got)


def test_the_kernel_reads_only_the_columns_it_is_given():
    model = tiny([2, 2, 1], [[[0.5, 0.0], [-1.0, 0.0]], [[1.0, 2.0]]], [[0.25, 1.0], [0.5]])  # input 2 unused
    first, run = model[0], plans.split(pruning.chain.layers(model))[1]
    kernel = packing.KernelLayers(run, [False, False], 2, np.array([0]), read=np.array([0]))
    x = torch.tensor([[1.0, 7.0], [-2.0, 3.0], [4.0, -1.0]])
    assert first.in_features == 2 and kernel(x).flatten().tolist() == [1.25, 6.5, 2.75]


@pytest.mark.parametrize("batch", [1, 32, 300])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
def test_for_inference_predicts_as_the_model(batch, sparsity):
    torch.manual_seed(0)
    model = models.mnist_mlp((784, 64, 32, 10))
    if sparsity:
        pruning.zero_prune(model, sparsity)
    fast = pruning.for_inference(model, batch)
    x = torch.rand(500, 28, 28)
    with torch.no_grad():
        expected = model.eval()(x)
    got = fast(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())


def every_way(model, x, tile=16):
    """model's logits through every plan for_inference weighs: each layer dense, sparse or rows."""
    layers = pruning.chain.layers(surgery.copy_of(model).eval().requires_grad_(False))
    before, run = plans.split(layers)
    folded = plans.gather(before, run[0][0])
    shape = plans.input_shape(layers, None)
    for way in plans.WAYS:
        for first in plans.WAYS:
            prepared = plans.plan(before, run, [first] + [way] * (len(run) - 1), folded, shape, True, model)
            for kernel in prepared.steps:
                if isinstance(kernel, packing.KernelLayers):
                    kernel.tile = tile
            yield prepared(x)


def test_every_plan_predicts_as_the_model_with_kept_pixels_and_normalisation():
    torch.manual_seed(0)
    model = models.mlp((30, 17, 10), inputs=torch.randperm(784)[:30]).eval()
    model = nn.Sequential(model[0], models.Normalize(shape=(30,)), *model[1:])  # as activation pruning leaves it
    x = torch.rand(20, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    for got in every_way(model, x):
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tile", [16, 32])
def test_an_input_that_is_not_finite_gives_nan_where_the_model_gives_nan(tile):
    torch.manual_seed(0)
    kept = torch.randperm(784)[:30]
    model = models.mlp((30, 17, 10), inputs=kept).eval()
    with torch.no_grad():
        model[1].weight[:, 3] = 0  # kept pixel 3 is read by no weight
    dropped = next(c for c in range(784) if c not in kept)
    x = torch.rand(40, 784)
    x[0, kept[3]] = float("nan")  # read by the model's layer, by no weight of it: NaN all the same
    x[1, kept[5]] = float("inf")
    x[2, dropped] = float("nan")  # a pixel the model does not read: no NaN
    x[39, kept[29]] = -float("inf")  # in a part tile, past the last multiple of 16
    with torch.no_grad():
        expected = model(x)
    assert expected[[0, 1, 39]].isnan().all() and expected[2:39].isfinite().all()
    for got in [*every_way(model, x, tile), pruning.for_inference(model, 1)(x[:3])]:
        expected_here = expected[:len(got)]
        assert torch.equal(got.isnan(), expected_here.isnan())
        assert torch.allclose(got.nan_to_num(), expected_here.nan_to_num(), rtol=1e-5, atol=1e-5)


def test_lenet5_runs_in_the_kernel_from_its_first_convolution_as_the_model():
    torch.manual_seed(0)
    model = pruning.zero_prune(models.lenet5(), 0.9)
    x = torch.rand(40, 1, 28, 28)
    x[3, 0, 0, 0] = float("nan")  # read by the first convolution alone: NaN in every logit of that image
    with torch.no_grad():
        expected = model.eval()(x)
    plan = inference.convolution_plan(pruning.chain.layers(model), (1, 28, 28), True, model, 16, {})
    assert plan.summary.startswith("layers from the first convolution (0: strips, 1: max, 2: strips, 3: max")
    for tile in (1, 16, 32):
        for step in plan.steps:
            step.tile = tile
        got = plan(x)
        assert torch.equal(got.isnan(), expected.isnan()) and got[3].isnan().all()
        assert torch.allclose(got.nan_to_num(), expected.nan_to_num(), rtol=1e-4, atol=1e-5)
    fast = pruning.for_inference(model, 16)
    assert torch.allclose(fast(x).nan_to_num(), expected.nan_to_num(), rtol=1e-4, atol=1e-5)
    for got in every_way(model, x):  # the plans that keep the convolutions in PyTorch
        assert torch.allclose(got.nan_to_num(), expected.nan_to_num(), rtol=1e-4, atol=1e-5)


def test_a_convolution_as_rows_by_hand():
    conv = nn.Conv2d(1, 1, 2, padding="same", bias=False)  # pads one row and column after
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]]]))
    lengths, index, values, bias, storage, strips = lowering.Lowered(conv, (1, 2, 2)).rows()
    # outputs (0,0) (0,1) (1,0) (1,1) of a 2x2 input: x00 + 2 x11, x01, x10, x11
    assert lengths.tolist() == [2, 1, 1, 1] and index.tolist() == [0, 3, 1, 2, 3]
    assert values.tolist() == [1.0, 2.0, 1.0, 1.0, 1.0] and bias.tolist() == [0] * 4 and storage == kernels.SPARSE
    assert strips is None
    lengths, index, _, _, storage, _ = lowering.Lowered(nn.MaxPool2d(2), (2, 2, 4)).rows()
    assert lengths.tolist() == [4] * 4 and storage == kernels.MAX
    assert index.tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]  # channel, then y, then x


def test_a_convolution_in_strips_by_hand():
    conv = nn.Conv2d(1, 1, (1, 3), padding=(0, 1), bias=False)  # y[x] = x[x - 1] + 2 x[x + 1] on a row of 10
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0, 0.0, 2.0]]]]))
    lengths, index, values, bias, storage, strips = lowering.Lowered(conv, (1, 1, 10)).rows(strips=True)
    # output 0 reads only x[1]; outputs 1-8 one strip of eight, each weight from its own input on; output 9 only x[8]
    assert lengths.tolist() == [1, 2, 1] and index.tolist() == [1, 0, 2, 8] and values.tolist() == [2, 1, 2, 1]
    assert strips.tolist() == [[0, 1 + (1 << 16)], [1, 8 + (1 << 16)], [9, 1 + (1 << 16)]]
    assert storage == kernels.STRIP and bias.tolist() == [0] * 10
    x = torch.randn(33, 1, 1, 10)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(10, 3)).eval()
    with torch.no_grad():
        expected = model(x)
    plan = inference.convolution_plan(pruning.chain.layers(model), (1, 1, 10), False, model, 16, {})
    assert plan.ways[0] == "strips"
    for tile in (1, 16, 32, 64):
        for step in plan.steps:
            step.tile = tile
        assert torch.allclose(plan(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_a_residual_networks_convolution_in_strips_computes_what_its_rows_do(stride):
    torch.manual_seed(stride)
    conv = nn.Conv2d(16, 16, 3, stride, 1)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.1)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(16 * (28 // stride) ** 2, 10)).eval()
    x = torch.randn(70, 16, 28, 28)
    with torch.no_grad():
        expected = model(x)
    run = inference.lowered(pruning.chain.layers(model), (16, 28, 28))[1]
    for strips in (False, True):
        kernel = packing.KernelLayers(run, [strips, False], 16 * 28 * 28)
        assert repr(kernel).startswith(f"KernelLayers({'strips' if strips else 'sparse'}, sparse")
        for tile in (1, 16, 32, 64):
            kernel.tile = tile
            assert torch.allclose(kernel(x.flatten(1)), expected, rtol=1e-4, atol=1e-5)


def test_a_first_convolution_reading_chosen_inputs_is_stored_as_rows():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    columns = torch.randperm(2 * 9 * 9).numpy()  # the convolution's inputs, in another order than x's
    kernel = packing.KernelLayers([(lowering.Lowered(conv, (2, 9, 9)), kernels.NONE)], [True], 2 * 9 * 9, columns)
    assert repr(kernel).startswith("KernelLayers(sparse;")  # strips would read inputs a step apart in x itself
    x = torch.randn(20, 2 * 9 * 9)
    with torch.no_grad():
        expected = conv(x[:, torch.from_numpy(columns)].view(-1, 2, 9, 9)).flatten(1)
    for tile in (1, 16):
        kernel.tile = tile
        assert torch.allclose(kernel(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_random_convolution_chains_through_the_kernel_give_the_models_logits(seed):
    torch.manual_seed(seed)
    generator = np.random.default_rng(seed)
    channels, size, layers = int(generator.integers(1, 4)), int(generator.integers(9, 20)), []
    for _ in range(int(generator.integers(1, 3))):
        out, kernel, stride, dilation = (int(generator.integers(1, top)) for top in (7, 4, 3, 3))
        padding = ["same", "valid", 0, 1][int(generator.integers(0, 4))] if stride == 1 else int(generator.integers(2))
        conv = nn.Conv2d(channels, out, kernel, stride, padding, dilation, bias=bool(generator.integers(0, 2)))
        with torch.no_grad():
            conv.weight.mul_(torch.rand_like(conv.weight) < generator.uniform(0.05, 1))
        layers += [conv, nn.ReLU()] + ([nn.MaxPool2d(2)] if generator.integers(0, 2) else [])
        channels = out
    body = nn.Sequential(*layers)
    flat = body(torch.zeros(1, layers[0].in_channels, size, size)).numel()
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(flat, 5)).eval()
    shape = (layers[0].in_channels, size, size)
    x = torch.randn(37, *shape)
    with torch.no_grad():
        expected = model(x)
    plan = inference.convolution_plan(pruning.chain.layers(model), shape, False, model, 16, {})
    for tile, threads in ((1, 1), (16, 1), (32, 2), (64, 2)):
        for step in plan.steps:
            step.tile, step.threads = tile, threads
        assert torch.allclose(plan(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer, lowered", [(nn.MaxPool2d(2), True), (nn.Conv2d(1, 2, 3, padding=1), True),
                                            (nn.Conv2d(1, 2, 3, padding_mode="reflect", padding=1), False),
                                            (nn.Conv2d(1, 2, 3, groups=1, bias=False, dilation=2), True),
                                            (nn.AvgPool2d(2), False), (nn.MaxPool2d(2, padding=1), False)])
def test_what_the_kernel_cannot_lower_keeps_the_convolutions_in_pytorch(layer, lowered):
    model = nn.Sequential(nn.Conv2d(1, 1, 3), layer, nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(1, 1, 12, 12))
    plan = inference.convolution_plan(pruning.chain.layers(model.eval()), (1, 12, 12), False, model, 16, {})
    assert (plan is not None) == lowered


def test_masks_and_shared_weights_are_read_as_the_weights_they_make(tmp_path):
    torch.manual_seed(0)
    model = models.mnist_mlp((784, 32, 10)).eval()
    masked = surgery.hold_below(copy.deepcopy(model), 0.03)  # torch.nn.utils.prune masks, not folded
    assert prune.is_pruned(masked)
    quantized = compressed.quantize(surgery.make_permanent(surgery.copy_of(masked)), 4)
    pruning.save(quantized, tmp_path / "q.bin", "compressed")
    x = torch.rand(64, 784)
    for m in (masked, quantized, pruning.load(tmp_path / "q.bin")):
        with torch.no_grad():
            expected = m.eval()(x)
        assert torch.allclose(pruning.for_inference(m, 64)(x), expected, rtol=1e-4, atol=1e-5)


def test_an_empty_batch_gives_no_predictions():
    torch.manual_seed(0)
    kept = models.mlp((30, 17, 10), inputs=torch.randperm(784)[:30])
    for model in (pruning.zero_prune(models.mnist_mlp((784, 32, 10)), 0.9), kept, models.lenet5()):
        with torch.no_grad():
            assert model.eval()(torch.rand(0, 1, 28, 28)).shape == (0, 10)
        for got in every_way(model, torch.rand(0, 1, 28, 28)):  # whichever plan for_inference would choose
            assert got.shape == (0, 10)


def test_inputs_it_was_not_planned_for_go_to_the_model_as_given():
    torch.manual_seed(0)
    model = pruning.zero_prune(models.mnist_mlp((784, 32, 10)), 0.9).eval()
    fast = pruning.for_inference(model, 4)
    x = torch.rand(4, 784, requires_grad=True)
    assert fast(x).requires_grad  # the model's own forward, gradients and all
    with pytest.raises(ValueError, match="reads images of 784 values"):
        fast(torch.rand(4, 100))


def test_for_inference_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = pruning.zero_prune(models.mnist_mlp((784, 32, 10)), 0.9).train()
    state = copy.deepcopy(model.state_dict())
    pruning.for_inference(model, 2)
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, "32", 1 << 21])
def test_batch_size_is_checked(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        pruning.for_inference(models.mnist_mlp(), batch_size)


def test_a_model_of_unknown_input_shape_asks_for_an_example():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 26 * 26, 3))
    with pytest.raises(ValueError, match="example="):
        pruning.for_inference(model)
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(pruning.for_inference(model, 5, example=x)(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", range(12))
def test_random_chains_through_the_kernel_give_the_models_logits(seed):
    """Differential: random widths, sparsities, batch sizes, tiles, threads and input layers; each
    prepared model's logits against the model's, whichever plan wins."""
    rng = np.random.default_rng(seed)
    sizes = [int(rng.integers(1, 90)) for _ in range(int(rng.integers(2, 5)))]
    density = float(rng.choice([0.0, 0.001, 0.02, 0.1, 0.5, 0.9, 1.0]))
    model = sparse_mlp(sizes, density, seed)
    if rng.random() < 0.5:  # the project's input layers, which the kernel folds into how it reads
        model = nn.Sequential(pruning.Normalize(0.1, 0.3, (sizes[0],)), *model).eval()
    batch = int(rng.choice([1, 2, 15, 17, 33, 64, 65, 200]))
    x = torch.rand(batch, sizes[0])
    fast = pruning.for_inference(model, batch)
    for kernel in [s for s in getattr(fast, "steps", []) if isinstance(s, packing.KernelLayers)]:
        kernel.tile = int(rng.choice(kernels.TILES[1:]))
        kernel.threads = int(rng.integers(1, 3))
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_layer_made_after_another_was_dropped_is_stored_as_itself():
    import gc
    torch.manual_seed(0)
    packed, shape = {}, (2, 6, 6)
    convs = [nn.Conv2d(2, 3, 3, padding=1).eval() for _ in range(20)]
    x = torch.rand(4, *shape)
    for conv in convs:  # each wrapper dropped before the next is made: CPython hands its memory, and id, on
        layer = lowering.Lowered(conv, shape)
        kernel = packing.KernelLayers([(layer, kernels.NONE)], [False], math.prod(shape), packed=packed)
        with torch.no_grad():
            torch.testing.assert_close(kernel(x.flatten(1)), conv(x).flatten(1), atol=1e-5, rtol=1e-5)
        del layer, kernel
        gc.collect()


def test_a_wrong_example_is_refused_before_the_kernel_reads_it():
    model = sparse_mlp((1000, 10), density=0.05)
    with pytest.raises(ValueError, match="example is not an input the model takes"):
        pruning.for_inference(model, 64, example=torch.rand(2, 16))
    _, run = plans.split(pruning.chain.layers(model))
    with pytest.raises(ValueError, match="reads 1000 of 16 inputs"):
        packing.KernelLayers(run, [False], 16)
    _, run = plans.split(pruning.chain.layers(sparse_mlp()))
    for routes in ([(0, 0, 0, -1)] * 3, [(0, 1, 0, -1), (1, 0, 0, 0), (0, 1, 0, -1)], [(0, 1, -3, -1)] * 3,
                   [(0, 1, 0, -1)] * 2):  # a layer writing what it reads or adds, above its buffer, one route short
        with pytest.raises(ValueError, match="each layer must read one buffer and write another"):
            packing.KernelLayers(run, [False] * 3, 40, routes=routes)


@pytest.mark.parametrize("default", [torch.float16, torch.bfloat16, torch.float64, "meta"])
def test_the_process_defaults_do_not_reach_the_kernels_buffers(default):
    model = sparse_mlp((40, 23, 13, 6), density=0.1)
    x = torch.rand(70, 40)
    kernel = kernel_of(model, False, 16, 2)
    expected = kernel(x)
    try:
        torch.set_default_device("meta") if default == "meta" else torch.set_default_dtype(default)
        got = kernel(x)
    finally:
        torch.set_default_device("cpu") if default == "meta" else torch.set_default_dtype(torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_the_kernel_refuses_inputs_of_another_shape():
    kernel = kernel_of(sparse_mlp(), False, 16, 1)
    for x in (torch.rand(3, 41), torch.rand(3, 40).double(), torch.rand(40, 3).T):
        with pytest.raises(ValueError, match="reads contiguous fp32 CPU inputs of 40 values each"):
            kernel(x)


def test_a_prepared_model_copies_and_pickles_as_a_model_does():
    import io
    import pickle
    model = sparse_mlp((40, 23, 13, 6), density=0.1)
    x = torch.rand(70, 40)
    fast = pruning.for_inference(model, 70)
    fast.steps = [kernel_of(model, False, 16, 2)]  # all in the kernel, whichever plan won
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast)), torch.load(buffer, weights_only=False)):
        assert torch.equal(other(x), fast(x))
    assert pruning.count_params(fast) == pruning.count_params(model)
    assert pruning.flops(fast, x[:1]) == pruning.flops(model, x[:1]) > 0  # its hooks run on the model as given
    assert set(fast.state_dict()) == {f"layers.{k}.{p}" for k in range(3) for p in ("weight", "bias")}


def test_hooks_on_a_prepared_model_or_on_every_module_run_as_nn_module_runs_them():
    model = sparse_mlp((40, 23, 13, 6), density=0.1)
    x = torch.rand(1, 40)
    fast = pruning.for_inference(model, 1)
    fast.steps = [kernel_of(model, False, 16, 1)]  # the kernel's call, whichever plan won
    fast.one_call = True
    expected = fast(x)
    seen = []
    own = fast.register_forward_hook(lambda m, i, out: seen.append("own") or out + 1)
    assert torch.equal(fast(x), expected + 1) and seen == ["own"]
    own.remove()
    every = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, i: seen.append(type(m).__name__))
    try:
        assert torch.equal(fast(x), expected)
    finally:
        every.remove()
    assert seen == ["own", "Prepared"]
    assert torch.equal(fast(x=x), expected) and len(seen) == 2  # by keyword, as nn.Module takes it


def test_a_forked_child_runs_a_prepared_model():
    import multiprocessing
    model = sparse_mlp((40, 23, 13, 6), density=0.1)
    x = torch.rand(200, 40)
    fast = pruning.for_inference(model, 200)
    fast.steps = [kernel_of(model, False, 16, 2)]
    expected = fast(x)  # the pool of threads started in this process
    with multiprocessing.get_context("fork").Pool(1, initializer=torch.set_num_threads, initargs=(1,)) as child:
        got = child.apply_async(fast, (x,)).get(timeout=60)
    assert torch.equal(got, expected)


def test_what_the_kernel_cannot_reproduce_stays_pytorchs():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    x = torch.rand(16, 40)
    hooked = sparse_mlp()
    hooked[0].register_forward_hook(lambda m, i, out: out + 1)
    for model in (nn.Sequential(nn.Linear(40, 20), nn.ReLU(), Doubled(20, 6)).eval(), hooked):
        with torch.no_grad():
            assert torch.equal(pruning.for_inference(model, 16)(x), model(x))
    with pytest.warns(UserWarning, match="it has hooks"):
        fast = pruning.for_inference(hooked, 16)
    assert fast.summary.startswith("the model as given")


def test_tracing_a_prepared_model_traces_the_model():
    model = sparse_mlp((40, 23, 13, 6), density=0.1)
    x = torch.rand(8, 40)
    fast = pruning.for_inference(model, 8)
    fast.steps = [kernel_of(model, False, 16, 1)]
    traced = torch.jit.trace(fast, x, check_trace=False)
    assert torch.allclose(traced(x), model(x), atol=1e-6)


def test_inputs_of_another_shape_than_planned_get_the_models_answer():
    model = sparse_mlp((40, 23, 13, 6), density=0.1)
    fast = pruning.for_inference(model, 8)
    fast.steps = [kernel_of(model, False, 16, 1)]
    assert fast(torch.rand(3, 1, 40)).shape == model(torch.rand(3, 1, 40)).shape == (3, 1, 6)
    for shape in ((3, 40, 1), (3, 20, 2)):
        with pytest.raises(RuntimeError):
            fast(torch.rand(shape))


def test_without_llvmlite_the_model_stays_pytorchs_with_a_warning(monkeypatch):
    from pruning import kernels
    monkeypatch.setattr(kernels, "available", lambda: False)
    with pytest.warns(UserWarning, match="llvmlite"):
        fast = pruning.for_inference(sparse_mlp(), 8)
    assert not isinstance(fast, plans.Prepared)


def test_shares_run_on_pytorchs_openmp_threads_each_once_and_a_failure_is_raised():
    import threading

    from pruning import packing
    assert packing.openmp() is not None  # Linux's PyTorch runs GNU OpenMP, loaded with torch
    seen, lock = [], threading.Lock()

    def work(k):
        with lock:
            seen.append((k, threading.get_ident()))

    packing.in_parallel(work, 2)
    assert sorted(k for k, _ in seen) == [0, 1]

    def failing(k):
        if k == 1:
            raise ValueError("share 1 failed")

    with pytest.raises(ValueError, match="share 1 failed"):
        packing.in_parallel(failing, 2)


# Graphs: residual sums and concatenations (graphplan.py) -----------------------------------

class Residual(nn.Module):
    """A stem, a residual block with BatchNorm, a strided branch beside a projection, average and max
    pooling concatenated, and a linear head: each run of kernel layers one node of the graph."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.down, self.project = nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Conv2d(4, 6, 1, stride=2)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)
        x = F.relu(self.down(x)) + self.project(x)
        x = torch.cat([F.adaptive_avg_pool2d(x, 1), F.adaptive_max_pool2d(x, 1)], 1)
        return self.fc(torch.flatten(x, 1))


def residual(sparsity=0.6):
    torch.manual_seed(0)
    model = Residual()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return pruning.zero_prune(model, sparsity).eval().requires_grad_(False)


def test_a_batchnorm_is_folded_into_the_convolution_before_it_with_its_zeros():
    from pruning import graphplan
    model = residual()
    conv, norm = model.stem[0], model.stem[1]
    x = torch.randn(3, 1, 7, 7)
    folded = graphplan.folded(conv, norm)
    torch.testing.assert_close(folded(x), norm(conv(x)), atol=1e-5, rtol=1e-5)
    assert torch.equal(folded.weight == 0, conv.weight == 0) and conv.weight is not folded.weight


def test_the_runs_of_a_graph_are_the_layers_one_path_goes_through():
    from pruning import graph, graphplan
    joined = graph.of(residual())
    layers = graphplan.norms_folded(joined.layers, joined.inputs)
    shapes, _ = graphplan.seen_on(layers, joined.inputs, torch.zeros(1, 1, 8, 8))
    kinds = [[type(layers[k]).__name__ for k in run] for run in graphplan.runs(layers, joined.inputs, shapes)]
    assert kinds == [["Conv2d", "Identity", "ReLU"],  # the stem, its BatchNorm folded into the convolution
                     ["Conv2d", "Identity", "ReLU", "Conv2d", "Identity"],  # the block, up to its sum
                     ["Conv2d", "ReLU"], ["Conv2d"],  # the strided branch, the projection
                     ["Linear"]]


@pytest.mark.parametrize("batch", [1, 5, 37])
def test_a_graph_with_every_run_in_the_kernel_computes_what_the_model_does(batch):
    from pruning import graph, graphplan
    model = residual()
    x = torch.randn(batch, 1, 8, 8)
    fast = graphplan.prepared(model, graph.of(model), (1, 8, 8), batch, x, 2, pick=lambda candidates, x: candidates[1])
    assert sum(isinstance(m, graphplan.Segment) for m in fast.graph.layers) == 5
    torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)
    x[0, 0, 3, 3] = float("nan")
    assert fast(x)[0].isnan().all() and not fast(x)[1:].isnan().any()
    other = torch.randn(batch, 1, 10, 10)  # inputs it was not planned for: the model as given
    assert torch.equal(fast(other), model(other))
    assert "5 runs" in fast.summary


def test_for_inference_takes_a_graph_and_predicts_as_it_does():
    model = residual(0.9)
    x = torch.randn(64, 1, 8, 8)
    fast = pruning.for_inference(model, 32, example=x)
    assert torch.equal(fast(x).argmax(1), model(x).argmax(1))
    assert fast.summary.startswith(("a graph: ", "every layer of the graph", "the model as given, in PyTorch: timed"))


@pytest.mark.parametrize("batch", [1, 5, 37])
def test_a_whole_graph_in_one_kernel_call_computes_what_the_model_does(batch):
    from pruning import graph, graphplan
    model = nn.Sequential(pruning.Normalize(shape=(1, 8, 8)), residual()).eval()
    x = torch.rand(batch, 1, 8, 8)
    fast = graphplan.prepared(model, graph.of(model), (1, 8, 8), batch, x, 2, pick=lambda candidates, x: candidates[-1])
    assert fast.summary.startswith("every layer of the graph") and len(fast.steps) == 1
    for tile, threads in ((16, 1), (32, 2), (64, 2)):
        fast.steps[0].tile, fast.steps[0].threads = tile, threads
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast(x.flatten(1)), model(x), atol=1e-5, rtol=1e-5)  # Normalize reshapes it
    x[0, 0, 3, 3] = float("nan")
    assert fast(x)[0].isnan().all() and not fast(x)[1:].isnan().any()
    other = torch.rand(batch, 1, 10, 10)  # inputs it was not planned for: the model as given
    with pytest.raises(ValueError, match="reads images of 64 values"):
        fast(other)


def test_a_graphs_buffers_are_taken_when_made_and_given_back_after_their_last_reader():
    from pruning import graph, graphplan, wholegraph
    joined = graph.of(residual())
    layers = graphplan.norms_folded(joined.layers, joined.inputs)
    shapes, _ = graphplan.seen_on(layers, joined.inputs, torch.rand(2, 1, 8, 8))
    nodes, _ = wholegraph.nodes_of(layers, joined.inputs, shapes)
    names = [(type(n.layer.module if hasattr(n, "layer") and hasattr(n.layer, "module") else n.layer).__name__,
              n.activation, n.adds is not None) for _, n in sorted(nodes.items())]
    assert names == [("Conv2d", kernels.RELU, False), ("Conv2d", kernels.RELU, False),  # the stem; the block's first
                     ("Conv2d", kernels.RELU, True),  # its second, the stem's outputs added, then its ReLU
                     ("Conv2d", kernels.RELU, False), ("Conv2d", kernels.NONE, True),  # the strided branch beside
                     ("AvgPool2d", kernels.NONE, False), ("MaxPool2d", kernels.NONE, False),  # the projection
                     ("Linear", kernels.NONE, False)]
    assert len({node.into[0] for node in nodes.values() if node.into is not None}) == 1  # one concatenation
    # (reads, writes, at row, adds): the input in buffer 0; the stem's outputs kept in 1 for the sum
    assert wholegraph.routes_of(nodes) == [(0, 1, 0, -1), (1, 0, 0, -1), (0, 2, 0, 1), (2, 0, 0, -1), (2, 1, 0, 0),
                                           (1, 2, 0, -1), (1, 2, 6, -1), (2, 1, 0, -1)]


def test_a_graph_the_kernel_cannot_run_in_one_call_is_refused_before_any_buffer():
    from pruning import graph, graphplan, wholegraph

    class Shared(nn.Module):  # the sum's later part also read by the concatenation: not added into it
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1), nn.Linear(256, 3)

        def forward(self, x):
            h = self.a(x)
            y = self.b(h)
            return self.fc(torch.flatten(torch.cat([y + h, y], 1), 1))

    for model in (Shared().eval(), nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU(), nn.Flatten(), nn.Linear(72, 3))):
        joined = graph.of(model)
        shapes, _ = graphplan.seen_on(list(joined.layers), joined.inputs, torch.rand(2, 1, 8, 8))
        assert wholegraph.nodes_of(list(joined.layers), joined.inputs, shapes) is None


def test_a_max_pooling_to_one_value_a_channel_is_taken_as_each_channels_largest():
    from pruning import graph, graphplan
    x = torch.randn(5, 3, 7, 6)
    x[0, 1, 2, 3] = float("nan")
    others = [nn.AdaptiveMaxPool2d(2), nn.AdaptiveMaxPool2d(1, return_indices=True), nn.AdaptiveAvgPool2d(1)]
    faster = graphplan.pools_made_faster([nn.AdaptiveMaxPool2d((1, 1))] + others)
    assert type(faster[0]) is graph.GlobalMax and faster[1:] == others
    torch.testing.assert_close(faster[0](x), nn.AdaptiveMaxPool2d(1)(x), atol=0, rtol=0, equal_nan=True)


def test_a_graph_that_reshapes_its_input_first_takes_every_shape_of_its_size_in_its_plan():
    from pruning import graph, graphplan

    def refused(x):
        raise AssertionError("the model as given ran")

    model = nn.Sequential(pruning.Normalize(shape=(1, 8, 8)), residual()).eval()
    x = torch.rand(9, 1, 8, 8)
    fast = graphplan.prepared(model, graph.of(model), (1, 8, 8), 9, x, 2, pick=lambda candidates, x: candidates[1])
    assert isinstance(fast, graphplan.FastGraph)  # each run its own call (the whole graph in one: below)
    expected = fast(x)
    fast.given = [refused]
    for shape in ((9, 64), (9, 8, 8)):
        torch.testing.assert_close(fast(x.reshape(shape)), expected, atol=0, rtol=0)
    runs = graphplan.prepared(residual(), graph.of(residual()), (1, 8, 8), 9, x, 2,
                              pick=lambda candidates, x: candidates[1])
    assert not runs.loose  # a convolution reads the input: only its own shape


def test_a_graphs_plan_copies_pickles_and_takes_an_empty_batch():
    import io
    import pickle

    from pruning import graph, graphplan
    model = residual()
    x = torch.randn(9, 1, 8, 8)
    fast = graphplan.prepared(model, graph.of(model), (1, 8, 8), 9, x, 2, pick=lambda candidates, x: candidates[-1])
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast)), torch.load(buffer, weights_only=False)):
        torch.testing.assert_close(other(x), model(x), atol=1e-5, rtol=1e-5)
    assert fast(torch.zeros(0, 1, 8, 8)).shape == (0, 3)
