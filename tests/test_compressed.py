"""The compressed model file: weight sharing, position encodings, and refusing damaged files."""

import functools
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pruning import criteria, surgery, training
from pruning.files import UserError
from pruning.formats import compressed as cz
from pruning.model import kept_inputs, linears, mlp


def pruned_mlp(sizes=(784, 64, 32, 10), sparsity=0.9, seed=0):
    torch.manual_seed(seed)
    model = mlp(sizes)
    return surgery.make_permanent(surgery.hold_below(model, criteria.threshold_for_sparsity(model, sparsity)))


def test_kmeans_by_hand():
    # linear start at 0, 5, 10; the values settle into their three groups
    centroids, codes = cz.kmeans(torch.tensor([0.0, 1.0, 2.0, 9.0, 10.0, 4.0, 6.0]), 3)
    assert centroids.tolist() == [1.0, 5.0, 9.5]
    assert codes.tolist() == [0, 0, 0, 2, 2, 1, 1]


def test_kmeans_drops_centroids_no_value_is_nearest_to():
    centroids, codes = cz.kmeans(torch.tensor([0.0, 0.0, 1.0]), 4)
    assert centroids.tolist() == [0.0, 1.0] and codes.tolist() == [0, 0, 1]


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_each_layer_shares_at_most_2_to_the_bits_values_and_zeros_stay_zero(bits):
    model = pruned_mlp()
    quantized = cz.quantize(model, bits)
    for layer, original in zip(linears(quantized), linears(model)):
        stored = layer.weight[layer.weight != 0]
        assert len(stored.unique()) <= 2 ** bits
        assert torch.equal(layer.weight == 0, original.weight == 0)


def test_zeros_stay_zero_while_the_shared_values_are_fine_tuned():
    model = pruned_mlp((6, 5, 3), sparsity=0.5)
    quantized = cz.quantize(model, 2)
    codes = [layer.parametrizations.weight[0].codes.clone() for layer in linears(quantized)]
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    before = [layer.parametrizations.weight[0].codebook.detach().clone() for layer in linears(quantized)]
    training.train(quantized, (x, y), epochs=3, lr=0.05, batch_size=8, seed=0)
    for layer, original, c, b in zip(linears(quantized), linears(model), codes, before):
        assert torch.equal(layer.weight == 0, original.weight == 0)
        assert torch.equal(layer.parametrizations.weight[0].codes, c)  # the assignment is fixed
        assert not torch.equal(layer.parametrizations.weight[0].codebook, b)  # the shared values moved
        assert len(layer.weight[layer.weight != 0].unique()) <= 4


def test_a_shared_value_gets_the_sum_of_its_weights_gradients():
    shared = cz.SharedWeights(torch.tensor([1.0, 2.0]), torch.tensor([[0, -1], [1, 0]]))
    weight = shared(None)
    assert weight.tolist() == [[1.0, 0.0], [2.0, 1.0]]
    (weight * torch.tensor([[3.0, 5.0], [7.0, 11.0]])).sum().backward()
    assert shared.codebook.grad.tolist() == [3.0 + 11.0, 7.0]


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.98, 0.999])
def test_the_file_round_trips_to_identical_predictions(sparsity, tmp_path):
    quantized = cz.quantize(pruned_mlp(sparsity=sparsity), 5)
    size = cz.save_compressed(quantized, tmp_path / "m.bin")
    assert size == (tmp_path / "m.bin").stat().st_size
    loaded = cz.load_compressed(tmp_path / "m.bin")
    x = torch.randn(100, 784)
    with torch.no_grad():
        assert torch.equal(loaded(x), quantized(x))
    for a, b in zip(linears(loaded), linears(quantized)):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_long_gaps_are_written_with_escape_bytes_and_decode_to_the_same_positions():
    positions = np.array([0, 254, 255 + 254 + 1, 100_000, 100_001])
    data = cz.encode_gaps(positions)
    # gaps 0, 253, 255 (= 255 + 0), 99,489 (= 390 * 255 + 39), 0
    assert list(data) == [0, 253, 255, 0] + [255] * 390 + [39, 0]
    assert cz.decode_gaps(data).tolist() == positions.tolist()


def test_positions_use_the_encoding_that_fits():
    dense = torch.zeros(4, 5, dtype=torch.long)
    assert set(cz.position_streams(dense)) == {cz.ALL}
    sparse = torch.full((4, 5), -1)
    sparse[1, 2] = 0
    streams = cz.position_streams(sparse)
    assert set(streams) == {cz.GAPS, cz.BITMASK}
    for kind, data in streams.items():
        assert cz.decode_positions(kind, data, 20).tolist() == [7]


@functools.cache
def compressed_bytes():
    """A compressed file of pruned_mlp(), made once (quantizing takes half a second): each test that
    damages it writes its own copy."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.bin"
        cz.save_compressed(cz.quantize(pruned_mlp(), 4), path)
        return path.read_bytes()


def saved(tmp_path):
    path = tmp_path / "m.bin"
    path.write_bytes(compressed_bytes())
    return path, path.read_bytes()


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:-1], "truncated"),
    (lambda data: data[:40], "truncated"),
    (lambda data: data[:10], "not a compressed model file"),
    (lambda data: data + b"\0", "truncated or extended"),
    (lambda data: data[:100] + bytes([data[100] ^ 1]) + data[101:], "checksum does not match"),
    (lambda data: data[:4] + b"\x09" + data[5:], "format version 9"),
    (lambda data: data[:4] + b"\x01" + data[5:], "format version 1"),
    (lambda data: b"\x89PNG\r\n\x1a\n" + data[8:], "not a compressed model file"),
    (lambda data: b"", "not a compressed model file"),
])
def test_damaged_or_foreign_files_are_refused_in_one_line(damage, message, tmp_path):
    path, data = saved(tmp_path)
    path.write_bytes(damage(data))
    with pytest.raises(UserError, match=message) as error:
        cz.load_compressed(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_an_input_pruned_model_keeps_its_pixels_in_the_file(tmp_path):
    torch.manual_seed(0)
    model = mlp([5, 4, 3], inputs=[1, 7, 20, 300, 783])
    cz.save_compressed(cz.quantize(model, 3), tmp_path / "m.bin")
    loaded = cz.load_compressed(tmp_path / "m.bin")
    assert kept_inputs(loaded).tolist() == [1, 7, 20, 300, 783]
    x = torch.randn(10, 784)
    with torch.no_grad():
        assert torch.equal(loaded(x), cz.quantize(model, 3)(x))


def test_the_shared_values_gradient_is_the_same_numbers_every_time():
    torch.manual_seed(0)
    codes, grad = torch.randint(-1, 32, (512, 784)), torch.randn(512, 784)  # the default MLP's first layer

    def codebook_grad():
        shared = cz.SharedWeights(torch.zeros(32), codes)
        shared(None).backward(grad)
        return shared.codebook.grad

    first = codebook_grad()
    assert all(torch.equal(codebook_grad(), first) for _ in range(10))
    by_hand = torch.stack([grad[codes == k].double().sum() for k in range(32)]).float()
    assert torch.allclose(first, by_hand, rtol=1e-4, atol=1e-3)


def repacked(data, body):
    """data's header over a new body."""
    import lzma
    import zlib
    packed = lzma.compress(body, format=lzma.FORMAT_RAW, filters=cz.LZMA_FILTERS)
    return cz.HEADER.pack(cz.MAGIC, data[4], len(packed), zlib.crc32(packed)) + packed


def body_of(data):
    import lzma
    return lzma.decompress(data[cz.HEADER.size:], format=lzma.FORMAT_RAW, filters=cz.LZMA_FILTERS)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16, torch.float32])
def test_a_compressed_file_loads_in_the_dtype_it_was_saved_in(dtype, tmp_path):
    import pruning
    model = pruned_mlp().to(dtype)
    pruning.save(model, tmp_path / "m.bin", storage="compressed")
    loaded = pruning.load(tmp_path / "m.bin")
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    x = torch.rand(8, 784, dtype=dtype)
    expected = cz.quantize(model, 5)(x.float()).to(dtype)  # the quantized model, in the dtype it loads in
    assert torch.allclose(loaded(x).float(), expected.float(), rtol=0.02, atol=0.02)


def test_a_version_2_file_loads_in_fp32_and_a_wrong_dtype_code_is_refused(tmp_path):
    path, data = saved(tmp_path)
    old = bytearray(repacked(data, body_of(data)[1:]))  # version 2: no dtype byte
    old[4] = 2
    path.write_bytes(bytes(old))
    assert {p.dtype for p in cz.load_compressed(path).parameters()} == {torch.float32}
    path.write_bytes(repacked(data, b"\x09" + body_of(data)[1:]))
    with pytest.raises(UserError, match="dtype 9 is not one of 4"):
        cz.load_compressed(path)


def test_a_model_pruned_by_pytorchs_masks_saves_compressed(tmp_path):
    from torch.nn.utils import prune

    import pruning
    model = pruned_mlp(sparsity=0.0)
    prune.l1_unstructured(model[0], "weight", amount=0.8)
    pruning.save(model, tmp_path / "m.bin", storage="compressed")
    loaded = pruning.load(tmp_path / "m.bin")
    assert (loaded[0].weight == 0).sum() >= (model[0].weight == 0).sum()
    assert prune.is_pruned(model)  # the user's model keeps its masks


def test_a_model_past_ten_million_parameters_loads_without_options(tmp_path):
    import pruning
    model = torch.nn.Sequential(torch.nn.Linear(3000, 3500))  # 10,503,500 parameters
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(3500, 3000) < 0.01)  # a CSR file of 99% zeros: 1.3 MB
    for storage in ("dense", "csr"):
        pruning.save(model, tmp_path / "big", storage=storage)
        assert pruning.count_params(pruning.load(tmp_path / "big")) == 10_503_500
