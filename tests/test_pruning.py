"""Unit tests on tiny models whose answers can be worked out by hand."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pruning
from cli import checkpoints, options, results
from pruning import chain, criteria, formats, measure, methods, schedules, surgery, training
from pruning import model as models
from pruning.model import count_params, count_weights, count_zeros, kept_inputs, linears, mlp, widths


def prune_below(model, threshold):
    return surgery.hold_below(copy.deepcopy(model), threshold)


def remove(model, keep, means=None, inputs=None):
    layers = chain.layers(model)
    return surgery.remove_units(layers, keep, [1] * len(keep), inputs, means)


def mean_activations(model, x):
    return criteria.statistics(chain.layers(model), x)[0]


def tiny(sizes, weights, biases):
    model = mlp(sizes)
    with torch.no_grad():
        for layer, w, b in zip(linears(model), weights, biases):
            layer.weight.copy_(torch.tensor(w))
            layer.bias.copy_(torch.tensor(b))
    return model


def test_the_mlp_has_the_documented_size():
    model = mlp()
    assert count_weights(model) == 784 * 512 + 512 * 256 + 256 * 128 + 128 * 10 == 566_528
    assert count_params(model) == 566_528 + 512 + 256 + 128 + 10 == 567_434
    assert widths(model) == (784, 512, 256, 128, 10)


# Zero pruning -------------------------------------------------------------------------

def zero_model():
    return tiny([2, 2, 1], [[[0.5, -0.0625], [0.125, -0.375]], [[0.03125, 1.0]]], [[0.25, -0.5], [0.0]])


def test_zero_pruning_zeroes_weights_strictly_below_the_threshold_and_no_bias():
    pruned = surgery.make_permanent(prune_below(zero_model(), 0.125))
    first, second = linears(pruned)
    assert first.weight.tolist() == [[0.5, 0.0], [0.125, -0.375]]  # |0.125| is not < 0.125
    assert second.weight.tolist() == [[0.0, 1.0]]
    assert count_zeros(pruned) == 2
    assert first.bias.tolist() == [0.25, -0.5]


def test_zero_pruning_at_threshold_zero_changes_nothing():
    model = zero_model()
    pruned = surgery.make_permanent(prune_below(model, 0.0))
    assert count_zeros(pruned) == 0
    state = pruned.state_dict()
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_threshold_for_sparsity_zeroes_exactly_that_fraction():
    model = zero_model()  # magnitudes 0.03125 0.0625 0.125 0.375 0.5 1.0
    for sparsity, zeros in [(0, 0), (1 / 6, 1), (0.5, 3), (5 / 6, 5)]:
        t = criteria.threshold_for_sparsity(model, sparsity)
        assert count_zeros(surgery.make_permanent(prune_below(model, t))) == zeros


def test_saliency_is_the_weight_squared_times_its_mean_squared_gradient():
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, 3.0]]))
    model = nn.Sequential(layer)
    # loss (w.x)^2: its gradient 2 (w.x) x is (4, 0) on x = (1, 0) and (0, 6) on x = (0, 1)
    losses = (model(torch.tensor([x])).square().sum() for x in ([1.0, 0.0], [0.0, 1.0]))
    (scores,) = criteria.saliencies(model, losses)
    assert scores.tolist() == [[2 ** 2 * (16 + 0) / 2, 3 ** 2 * (0 + 36) / 2]]  # [[32, 162]]
    assert layer.weight.grad is None


@pytest.mark.parametrize("sparsity, kept", [
    (0.0, [[True, True, True], [True, True]]),
    (0.2, [[False, True, True], [True, True]]),
    (0.4, [[False, False, False], [False, True]]),  # the tie at 2 goes with the cut: at least 40% dropped
    (0.9, [[False, False, False], [False, False]]),
])
def test_keep_largest_ranks_all_tensors_together_and_drops_ties_at_the_cut(sparsity, kept):
    scores = [torch.tensor([1.0, 2.0, 2.0]), torch.tensor([2.0, 3.0])]
    assert [m.tolist() for m in criteria.keep_largest(scores, sparsity)] == kept


def test_pruning_by_saliency_removes_what_the_loss_never_feels_however_large():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.1, 5.0], [-0.1, -5.0]]))
    x = torch.randn(64, 2)
    x[:, 1] = 0  # the second input is always zero: its large weights change no output
    y = (x[:, 0] > 0).long()
    by_magnitude = methods.zero_prune(copy.deepcopy(model), 0.5)
    assert by_magnitude[0].weight[:, 0].eq(0).all() and by_magnitude[0].weight[:, 1].ne(0).all()
    model.train()
    by_saliency = methods.zero_prune(model, 0.5, saliency=methods.obd_saliency((x, y), batch_size=16))
    assert by_saliency[0].weight[:, 1].eq(0).all() and by_saliency[0].weight[:, 0].ne(0).all()
    assert model.training and model[0].weight.grad is None


def test_pruning_by_saliency_in_steps_keeps_every_earlier_zero_and_reaches_the_sparsity():
    torch.manual_seed(0)
    model = mlp([6, 8, 3])
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    seen = []

    def finetune(m):
        training.train(m, (x, y), epochs=1, batch_size=8)
        seen.append([layer.weight.detach().eq(0) for layer in linears(m)])
    saliency = methods.obd_saliency((x, y), batch_size=8, teacher=copy.deepcopy(model))
    methods.zero_prune(model, 0.75, steps=3, finetune=finetune, saliency=saliency)
    for before, after in zip(seen, seen[1:]):
        assert all((a | ~b).all() for b, a in zip(before, after))  # a zero stays zero
    assert count_zeros(model) == math.ceil(0.75 * count_weights(model))


def test_a_units_saliency_is_the_mean_squared_gradient_with_respect_to_its_gate():
    first, second = nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        first.weight.copy_(torch.eye(2))
        second.weight.copy_(torch.tensor([[3.0, 5.0]]))
    layers = [first, nn.ReLU(), second]

    def losses(forward):  # the output itself: its gradient is 3 or 5 times the unit's value, or 0
        return (forward(torch.tensor([x])).sum() for x in ([1.0, 2.0], [2.0, 0.0]))
    pixels, hidden = criteria.unit_saliencies(layers, torch.tensor([1.0, 0.0]), losses)
    assert hidden.tolist() == [(3 ** 2 + 6 ** 2) / 2, (10 ** 2 + 0) / 2]  # unit 1: 3 x 1, 3 x 2; unit 2: 5 x 2, 5 x 0
    assert pixels.tolist() == [(0 + 3 ** 2) / 2, (10 ** 2 + 0) / 2]  # a pixel's gate scales x - mean: (0, 2), (1, 0)


def test_pruning_units_by_saliency_removes_the_most_active_unit_when_nothing_reads_it():
    model = mlp([2, 3, 2])
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[5.0, 5.0], [1.0, 0.0], [0.0, 1.0]]))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[0.0, 1.0, -1.0], [0.0, -1.0, 1.0]]))  # unit 0 feeds nothing
    torch.manual_seed(0)
    x = torch.rand(64, 2)
    y = (x[:, 0] > x[:, 1]).long()
    layers = chain.layers(model)

    def first_rows(criterion):
        smaller = methods.shrink(model, [2, 2, 2], x, criterion, False, surgery.spatial(layers, x))
        return smaller[0].weight.tolist()
    assert [5.0, 5.0] in first_rows("activation")
    assert first_rows(methods.unit_saliency((x, y), batch_size=16)) == [[1.0, 0.0], [0.0, 1.0]]


def test_fine_tuning_keeps_pruned_weights_at_exactly_zero_after_every_step():
    torch.manual_seed(0)
    model = mlp([6, 5, 4, 3])
    pruned = prune_below(model, 0.2)
    masks = [layer.weight_mask.bool() for layer in linears(pruned)]
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    steps = []

    def check():  # as a penalty, called in every step before its backward pass: after the step before
        steps.append(all((layer.weight[~m] == 0).all() for layer, m in zip(linears(pruned), masks)))
        return 0

    training.train(pruned, (x, y), epochs=2, lr=0.1, batch_size=8, seed=0, penalty=check)
    assert len(steps) == 10 and all(steps)
    surgery.make_permanent(pruned)
    for layer, m in zip(linears(pruned), masks):
        assert (layer.weight[~m] == 0).all() and (layer.weight[m] != 0).all()


def test_cubic_schedule_by_hand():
    # s_k = 0.8 (1 - (1 - k/4)^3): 0.8 * 37/64, 0.8 * 7/8, 0.8 * 63/64, 0.8
    assert schedules.cubic_schedule(0.8, 4) == pytest.approx([0.4625, 0.7, 0.7875, 0.8])
    assert schedules.cubic_schedule(0.985, 1) == [0.985]


def test_magnitude_ranking_is_global_across_layers():
    # magnitudes: layer 1 holds 0.5 0.0625 0.125 0.375, layer 2 holds 0.03125 1.0; the three
    # smallest overall are in both layers, though layer 2 is the smaller layer
    model = zero_model()
    pruned = surgery.make_permanent(prune_below(model, criteria.threshold_for_sparsity(model, 0.5)))
    first, second = linears(pruned)
    assert first.weight.tolist() == [[0.5, 0.0], [0.0, -0.375]]
    assert second.weight.tolist() == [[0.0, 1.0]]


def test_pruning_in_steps_holds_every_pruned_weight_at_zero_after_every_optimiser_step():
    torch.manual_seed(0)
    model = mlp([6, 5, 4, 3])
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    zeros_per_step, held = [], []

    step = 0

    def finetune(pruned):
        nonlocal step
        step += 1
        masks = [layer.weight_mask.bool() for layer in linears(pruned)]
        zeros_per_step.append(sum((~m).sum().item() for m in masks))

        def check():  # as a penalty, called in every step before its backward pass: after the step before
            held.append(all((layer.weight[~m] == 0).all() for layer, m in zip(linears(pruned), masks)))
            return 0

        training.train(pruned, (x, y), epochs=1, lr=0.1, batch_size=8, seed=step, penalty=check)

    pruned = methods.zero_prune(copy.deepcopy(model), 0.5, steps=3, finetune=finetune)
    weights = count_weights(model)  # 6*5 + 5*4 + 4*3 = 62
    assert zeros_per_step == [round(s * weights) for s in schedules.cubic_schedule(0.5, 3)] == [22, 30, 31]
    assert len(held) == 3 * 5 and all(held)
    assert count_zeros(pruned) == 31 and not any(hasattr(m, "weight_mask") for m in pruned)
    assert count_zeros(model) == 0


def test_distillation_loss_is_cross_entropy_at_weight_zero_and_kl_at_weight_one():
    torch.manual_seed(0)
    logits, teacher, labels = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    ce = F.cross_entropy(logits, labels)
    assert torch.equal(training.distillation_loss(logits, labels, teacher, temperature=4.0, weight=0.0), ce)
    assert torch.equal(training.distillation_loss(logits, labels, None, temperature=4.0, weight=0.5), ce)
    # at weight 1 only the teacher counts: T^2 KL(softmax(t/T) || softmax(s/T)), zero for the teacher itself
    p, log_q = F.softmax(teacher / 2, 1), F.log_softmax(logits / 2, 1)
    kl = (p * (p.log() - log_q)).sum(1).mean()
    soft = {"temperature": 2.0, "weight": 1.0}
    assert training.distillation_loss(logits, labels, teacher, **soft).item() == pytest.approx(4 * kl.item())
    assert training.distillation_loss(teacher, labels, teacher, **soft).item() == pytest.approx(0, abs=1e-6)


def test_the_mlp_takes_the_hidden_widths_asked_for():
    args = options.parser("", []).parse_args(["--hidden", "300", "100"])
    model = models.mnist_mlp(checkpoints.sizes(args))
    assert widths(model) == (784, 300, 100, 10)
    assert count_weights(model) == 784 * 300 + 300 * 100 + 100 * 10 == 266_200


def test_sparse_file_round_trips_to_identical_predictions(tmp_path):
    torch.manual_seed(0)
    model = models.mnist_mlp()
    pruned = surgery.make_permanent(prune_below(model, criteria.threshold_for_sparsity(model, 0.95)))
    formats.save(pruned, tmp_path / "m.pt", "csr")
    loaded = formats.load(tmp_path / "m.pt")
    x = torch.rand(64, 784)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    assert torch.allclose(pruning.for_inference(loaded, 64)(x), pruned(x), atol=1e-5)


def test_sparse_file_is_within_ten_percent_of_what_csr_needs(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    for sparsity in (0.5, 0.9, 0.95, 0.98, 0.99):
        pruned = surgery.make_permanent(prune_below(model, criteria.threshold_for_sparsity(model, sparsity)))
        size = formats.save(pruned, tmp_path / "m.pt", "csr")
        assert size == (tmp_path / "m.pt").stat().st_size
        assert formats.csr_bytes_needed(pruned) <= size <= 1.10 * formats.csr_bytes_needed(pruned)


def test_csr_bytes_needed_by_hand():
    pruned = surgery.make_permanent(prune_below(zero_model(), 0.125))
    # layer 1: 3 values and column indices, 3 row pointers, 2 biases; layer 2: 1, 2, 1
    assert formats.csr_bytes_needed(pruned) == (8 * 3 + 4 * 3 + 4 * 2) + (8 * 1 + 4 * 2 + 4 * 1)


# Activation pruning -------------------------------------------------------------------

def test_mean_activations_by_hand():
    model = tiny([1, 2, 1], [[[1.0], [-1.0]], [[1.0, 1.0]]], [[0.0, 0.0], [0.0]])
    means = mean_activations(model, torch.tensor([[1.0], [3.0], [-2.0], [2.0]]))
    assert [m.tolist() for m in means] == [[1.5, 0.5]]  # (1 + 3 + 0 + 2) / 4 and (0 + 0 + 2 + 0) / 4


def test_neurons_below_the_threshold_go_and_a_layer_is_never_emptied():
    means = [torch.tensor([0.0, 0.5, 0.2]), torch.tensor([0.1, 0.05])]
    keep, rescued = criteria.neurons_to_keep(means, 0.3)
    assert [k.tolist() for k in keep] == [[False, True, False], [True, False]]
    assert rescued == [1]
    keep, rescued = criteria.neurons_to_keep(means, 0.0)
    assert all(k.all() for k in keep) and rescued == []


def test_widths_round_up_to_a_multiple_with_the_strongest_neurons_below_the_threshold():
    means = [torch.tensor([0.0, 0.5, 0.2, 0.9, 0.1]), torch.tensor([0.1, 0.05, 0.3])]
    keep, rescued = criteria.neurons_to_keep(means, 0.3, multiple=2)
    assert [k.tolist() for k in keep] == [[False, True, False, True, False], [True, False, True]]
    keep, rescued = criteria.neurons_to_keep(means, 0.4, multiple=4)
    assert [k.tolist() for k in keep] == [[False, True, True, True, True], [True, True, True]]  # capped at 3
    assert rescued == [1]


def dead_neuron_model():
    # hidden neuron 1 gets no input and a negative bias: its activation is always 0
    return tiny([2, 3, 2, 2], [[[1.0, 2.0], [0.0, 0.0], [-1.0, 1.0]], [[1.0, 5.0, 1.0], [2.0, -3.0, 1.0]],
                               [[1.0, 0.0], [0.5, 1.0]]],
                [[0.5, -1.0, 0.0], [0.25, 0.5], [0.0, 0.75]])


def test_removing_dead_neurons_keeps_the_outputs_exactly():
    model = dead_neuron_model()
    keep = [torch.tensor([True, False, True]), torch.tensor([True, True])]
    smaller = remove(model, keep)
    x = torch.tensor([[1.0, -2.0], [0.5, 0.5], [-3.0, 1.0]])
    with torch.no_grad():
        assert torch.equal(smaller(x), model(x))
    assert widths(smaller) == (2, 2, 2, 2)
    assert count_params(smaller) == (2 * 2 + 2) + (2 * 2 + 2) + (2 * 2 + 2) == 18
    assert count_params(model) == (2 * 3 + 3) + (3 * 2 + 2) + (2 * 2 + 2) == 23


def test_threshold_zero_keeps_the_model_unchanged():
    torch.manual_seed(0)
    model = mlp([20, 16, 8, 3])
    x = torch.randn(50, 20)
    keep, _ = criteria.neurons_to_keep(mean_activations(model, x), 0.0)
    same = remove(model, keep)
    assert count_params(same) == count_params(model)
    with torch.no_grad():
        assert torch.equal(same(x), model(x))


def test_rebuilt_layers_have_the_counted_parameters():
    torch.manual_seed(0)
    model = mlp([10, 6, 4, 2])
    keep = [torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool), torch.tensor([0, 1, 0, 0], dtype=torch.bool)]
    smaller = remove(model, keep)
    assert widths(smaller) == (10, 3, 1, 2)
    assert count_params(smaller) == (10 * 3 + 3) + (3 * 1 + 1) + (1 * 2 + 2) == 41
    assert all(isinstance(m, nn.Linear) for m in linears(smaller))
    first = linears(smaller)[0]
    assert torch.equal(first.weight, linears(model)[0].weight[[0, 2, 3]])


def test_bias_compensation_is_exact_for_a_constant_activation():
    # hidden neuron 1 gets no input and a positive bias: its activation is always 0.75
    model = dead_neuron_model()
    with torch.no_grad():
        linears(model)[0].bias[1] = 0.75
    x = torch.tensor([[1.0, -2.0], [0.5, 0.5], [-3.0, 1.0]])
    means = mean_activations(model, x)
    assert means[0][1].item() == 0.75
    keep = [torch.tensor([True, False, True]), torch.tensor([True, True])]
    compensated = remove(model, keep, means)
    assert linears(compensated)[1].bias.tolist() == [0.25 + 5.0 * 0.75, 0.5 - 3.0 * 0.75]
    with torch.no_grad():
        assert torch.allclose(compensated(x), model(x), atol=1e-6)
        assert not torch.allclose(remove(model, keep)(x), model(x))


def test_removing_a_constant_input_pixel_keeps_every_output_exactly():
    model = dead_neuron_model()  # inputs: pixel 0 varies, pixel 1 is always 0.5
    x = torch.tensor([[1.0, 0.5], [-2.0, 0.5], [0.25, 0.5]])
    strength, means, _ = criteria.scores(chain.layers(model), x, "activation", [1, 1, 1])
    assert strength[0].tolist() == [pytest.approx(x[:, 0].std().item()), 0.0] and means[0][1].item() == 0.5
    smaller = remove(model, [torch.ones(3, dtype=torch.bool), torch.ones(2, dtype=torch.bool)],
                                inputs=(torch.tensor([True, False]), means[0]))
    assert widths(smaller) == (1, 3, 2, 2) and kept_inputs(smaller).tolist() == [0]
    # the first layer's bias takes the pixel's weights times 0.5: 0.5 + 2 * 0.5, -1 + 0, 0 + 1 * 0.5
    assert linears(smaller)[0].bias.tolist() == [1.5, -1.0, 0.5]
    with torch.no_grad():
        assert torch.equal(smaller(x), model(x))


def test_an_input_pruned_model_reads_whole_images_as_the_small_model_reads_its_pixels():
    torch.manual_seed(0)
    model = mlp([12, 6, 3])
    x = torch.randn(30, 12)
    keep = torch.tensor([i % 3 == 0 for i in range(12)])
    pruned = remove(model, [torch.ones(6, dtype=torch.bool)], inputs=(keep, x.mean(0)))
    small = mlp([4, 6, 3])
    small.load_state_dict({f"{int(k[0]) - 1}{k[1:]}": v for k, v in pruned.state_dict().items() if k != "0.indices"})
    assert pruned[0].size == 12
    with torch.no_grad():
        assert torch.equal(pruned(x), small(x[:, [0, 3, 6, 9]]))
    # pruning again keeps indices into the original image, not into the kept pixels
    again = remove(pruned, [torch.ones(6, dtype=torch.bool)],
                              inputs=(torch.tensor([False, True, True, False]), x[:, [0, 3, 6, 9]].mean(0)))
    assert kept_inputs(again).tolist() == [3, 6]


def test_target_widths_scale_every_layer_by_one_factor_to_the_parameter_budget():
    # 784-512-256-128-10 has 567,434 parameters; at half of each width (392-256-128-64-10):
    # 392*256+256 + 256*128+128 + 128*64+64 + 64*10+10 = 100,608 + 32,896 + 8,256 + 650 = 142,410
    layers, spatial = chain.layers(mlp()), [1, 1, 1, 1]
    assert models.mlp_params([784, 512, 256, 128, 10]) == 567_434
    assert surgery.params_at(layers, [392, 256, 128, 64, 10], spatial) == 142_410
    assert surgery.target_widths(layers, spatial, 142_410, prune_inputs=True) == [392, 256, 128, 64, 10]
    assert surgery.target_widths(layers, spatial, 142_409, prune_inputs=True) == [391, 255, 127, 63, 10]
    # without the inputs only the hidden layers shrink: 784*256+256 + 32,896 + 8,256 + 650 = 242,762 at half
    assert surgery.target_widths(layers, spatial, 242_762, prune_inputs=False) == [784, 256, 128, 64, 10]


def test_shrinking_in_steps_follows_the_cubic_schedule():
    torch.manual_seed(0)
    model = mlp([20, 16, 8, 3])
    x = torch.randn(50, 20)
    seen = []
    model.eval()
    methods.activation_prune(model, x, 0.6, steps=3, prune_inputs=True,
                             finetune=lambda pruned: seen.append(list(widths(pruned))))
    assert not any(m.training for m in model.modules())  # left in the mode it was in
    # 0.6 (1 - (1 - k/3)^3) of the 499 parameters (20*16+16 + 16*8+8 + 8*3+3) removed after step k:
    # 0.6 * 19/27, 0.6 * 26/27, 0.6 of them, so at most 288.3, 210.7 and 199.6 left
    assert count_params(model) == 499
    budgets = [(1 - r) * 499 for r in schedules.cubic_schedule(0.6, 3)]
    assert budgets == pytest.approx([288.3, 210.7, 199.6], abs=0.05)
    layers = chain.layers(model)
    assert seen == [surgery.target_widths(layers, [1, 1, 1], budget, prune_inputs=True) for budget in budgets]
    assert all(models.mlp_params(w) <= budget for w, budget in zip(seen, budgets))
    assert widths(model) == (20, 16, 8, 3)  # the model given is left as it was


# Tables -------------------------------------------------------------------------------

def test_markdown_table():
    rows = [{"t": 0.5, "n": 1234}, {"t": 0.25, "n": 5}]
    assert results.markdown_table(rows, [("T", "t", "{:.2f}".format), ("Count", "n", "{:,}".format)]) == (
        "|    T | Count |\n"
        "|-----:|------:|\n"
        "| 0.50 | 1,234 |\n"
        "| 0.25 |     5 |")


def test_rows_over_seeds_hold_means_and_standard_deviations():
    rows = [{"t": 0.5, "acc": 98.0, "widths": [10, 4], "n": 7, "note": [1, "a"], "pixels": [3, 5], "same": [1, 2]},
            {"t": 0.5, "acc": 97.0, "widths": [12, 4], "n": 7, "note": [2, "b"], "pixels": [3, 7], "same": [1, 2]}]
    row = results.mean_row(rows)
    assert row == {"t": 0.5, "acc": 97.5, "acc_std": pytest.approx(0.5 ** 0.5), "widths": [11, 4],
                   "widths_std": [pytest.approx(2 ** 0.5), 0.0], "n": 7, "note": results.VARIES,
                   "pixels": results.VARIES, "same": [1, 2]}
    table = results.markdown_table([row], [("Acc", "acc", "{:.2f}%".format), ("N", "n", "{:,}".format),
                                          ("W", "widths", lambda w: "-".join(f"{x:.0f}" for x in w)),
                                          ("Note", "note", str)])
    assert table.splitlines()[-1] == "| 97.50 ± 0.71% | 7 | 11-4 ± 1-0 | varies |"


def train_with_torch_optim(model, x, y, epochs, lr, batch_size, seed):
    """training.train's recipe written with torch.optim.Adam (fused) and CosineAnnealingLR: the reference."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * math.ceil(len(x) / batch_size))
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            schedule.step()


def test_training_with_masks_folded_matches_masking_at_every_forward_exactly():
    torch.manual_seed(0)
    dense = mlp([6, 5, 4, 3])
    model, reference = prune_below(dense, 0.2), prune_below(dense, 0.2)  # reference: masks in every forward
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    train_with_torch_optim(reference, x, y, epochs=2, lr=0.1, batch_size=8, seed=0)
    training.train(model, (x, y), epochs=2, lr=0.1, batch_size=8, seed=0)
    assert all(hasattr(layer, "weight_mask") for layer in linears(model))  # the masks are back
    for ours, theirs in zip(linears(model), linears(reference)):  # a masked layer's weight: as of its last forward
        assert torch.equal(ours.weight_orig * ours.weight_mask, theirs.weight_orig * theirs.weight_mask)
        assert torch.equal(ours.bias, theirs.bias)
        assert torch.equal(ours.weight_mask, theirs.weight_mask)


def test_training_takes_the_steps_of_torch_optim_adam_and_its_cosine_schedule_exactly():
    torch.manual_seed(0)
    model, reference = mlp([6, 5, 4, 3]), mlp([6, 5, 4, 3])
    reference.load_state_dict(model.state_dict())
    for net in (model, reference):
        net.unused = nn.Parameter(torch.ones(2))  # no gradient ever: Adam leaves it alone
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    train_with_torch_optim(reference, x, y, epochs=3, lr=0.01, batch_size=8, seed=3)
    training.train(model, (x, y), epochs=3, lr=0.01, batch_size=8, seed=3)
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(model.parameters(), reference.parameters()))
    assert model.unused.tolist() == [1.0, 1.0]


def test_unit_norms_by_hand():
    # unit 1: in (3, 0) with bias 4, out 12: sqrt(9 + 16 + 144) = 13; unit 2: nothing in or out;
    # pixels: the first layer's columns, (3, 0) and (0, 0)
    model = tiny([2, 2, 1], [[[3.0, 0.0], [0.0, 0.0]], [[12.0, 0.0]]], [[4.0, 0.0], [0.0]])
    layers = chain.layers(model)
    pixels, hidden = criteria.unit_norms(layers, [1, 1], prune_inputs=True)
    assert pixels.tolist() == [3.0, 0.0] and hidden.tolist() == [13.0, 0.0]
    assert [n.tolist() for n in criteria.unit_norms(layers, [1, 1])] == [[13.0, 0.0]]


def test_group_lasso_penalty_by_hand_and_its_gradient_where_a_unit_is_gone():
    model = tiny([2, 2, 1], [[[3.0, 0.0], [0.0, 0.0]], [[12.0, 0.0]]], [[4.0, 0.0], [0.0]])
    penalty = methods.group_lasso(model, 0.5, torch.zeros(1, 2), prune_inputs=True)()
    assert penalty.item() == 0.5 * (3 + 0 + 13 + 0)
    penalty.backward()
    first, second = linears(model)
    # d|g|/dw = w / |g|: 3/3 + 3/13 for the weight both groups hold, 4/13 for the bias, 12/13 out
    assert first.weight.grad.flatten().tolist() == pytest.approx([0.5 * (1 + 3 / 13), 0.0, 0.0, 0.0])
    assert first.bias.grad.tolist() == pytest.approx([0.5 * 4 / 13, 0.0])
    assert second.weight.grad.flatten().tolist() == pytest.approx([0.5 * 12 / 13, 0.0])
    assert second.bias.grad is None  # the outputs are in no group


def test_training_with_a_group_lasso_moves_the_units_it_can_spare_toward_zero():
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = (x[:, 0] > 0).long()  # one pixel decides; the others carry nothing
    plain, lassoed = mlp([4, 8, 2]), mlp([4, 8, 2])
    lassoed.load_state_dict(plain.state_dict())
    training.train(plain, (x, y), epochs=30, lr=0.01, batch_size=32)
    training.train(lassoed, (x, y), epochs=30, lr=0.01, batch_size=32,
                   penalty=methods.group_lasso(lassoed, 0.05, x[:1], prune_inputs=True))
    useless = [criteria.unit_norms(chain.layers(m), [1, 1], True)[0][1:].sum().item() for m in (plain, lassoed)]
    assert useless[1] < 0.2 * useless[0]
    assert training.accuracy(lassoed, (x, y)) > 95


def test_cosine_rates_are_the_learning_rates_of_cosine_annealing_to_the_bit():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2345)
    expected = []
    for _ in range(2345):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert list(training.cosine_rates(1e-3, 2345)) == expected


def test_training_inside_autocast_casts_the_updated_weights_every_step():
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    cached, uncached = mlp([6, 5, 3]), mlp([6, 5, 3])
    uncached.load_state_dict(cached.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # caches each weight's cast until it is left
        training.train(cached, (x, y), epochs=2, lr=0.1, batch_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        training.train(uncached, (x, y), epochs=2, lr=0.1, batch_size=8)
    assert all(torch.equal(a, b) for a, b in zip(cached.parameters(), uncached.parameters()))


def test_bf16_forward_runs_the_products_before_the_logits_in_bf16_and_the_logits_in_fp32():
    torch.manual_seed(0)
    model, x = mlp([6, 5, 4, 3]), torch.randn(8, 6)
    seen = []
    for layer in linears(model):
        layer.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    out = training.bf16_forward(model)(x)
    assert seen == [torch.bfloat16, torch.bfloat16, torch.float32] and out.dtype == torch.float32
    assert torch.allclose(out, model(x), rtol=0.02, atol=0.02)  # bf16 keeps about three significant digits
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_training_in_bf16_learns_as_fp32_does_with_other_numbers_and_holds_the_masks():
    torch.manual_seed(0)
    x = torch.randn(512, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    fp32, bf16 = mlp([6, 16, 3]), mlp([6, 16, 3])
    bf16.load_state_dict(fp32.state_dict())
    surgery.hold_below(fp32, 0.05)
    surgery.hold_below(bf16, 0.05)
    held = [layer.weight_mask == 0 for layer in linears(bf16)]
    assert sum(zero.sum() for zero in held) > 0
    for model, bf16_products in ((fp32, False), (bf16, True)):
        training.train(model, (x, y), epochs=20, lr=0.01, batch_size=32, bf16=bf16_products)
    assert training.accuracy(bf16, (x, y)) > 95 and abs(training.accuracy(bf16, (x, y)) -
                                                        training.accuracy(fp32, (x, y))) < 2
    assert not all(torch.equal(a, b) for a, b in zip(fp32.parameters(), bf16.parameters()))
    assert all((layer.weight[zero] == 0).all() for layer, zero in zip(linears(bf16), held))


def test_training_in_bf16_refuses_a_network_that_is_not_a_chain_or_has_no_weighted_layer():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 4)

        def forward(self, x):
            return self.layer(x) + x

    data = (torch.randn(8, 4), torch.randint(0, 4, (8,)))
    for network in (Residual(), nn.Sequential(nn.ReLU())):
        with pytest.raises(chain.NotAChain):
            training.train(network, data, epochs=1, bf16=True)


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    for flags, expected in (("fpu avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True),
                            ("fpu avx2 avx512f", False), (None, None)):
        monkeypatch.setattr(measure, "cpu_info", lambda key, flags=flags: flags)
        assert measure.native_bf16() is expected


def test_training_on_shifted_images_distils_from_a_teacher_judging_the_same_images():
    torch.manual_seed(0)
    x, y = torch.rand(64, 784), torch.randint(0, 10, (64,))
    teacher, student = models.mnist_mlp((784, 8, 10)), models.mnist_mlp((784, 8, 10))
    seen = []
    teacher.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].clone()))
    student.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].clone()) if module.training
                                  else None)
    training.train(student, (x, y), epochs=1, batch_size=32, teacher=teacher, shift=2)
    assert len(seen) == 4 and torch.equal(seen[0], seen[1]) and torch.equal(seen[2], seen[3])  # teacher, student
    unmoved = sum(any(torch.equal(row, image) for image in x) for row in seen[0])
    assert unmoved < 8  # most moved: 1 in 25 moves is none
    with pytest.raises(ValueError, match="teacher model"):
        training.train(student, (x, y), epochs=1, teacher=training.logits(teacher, x), shift=1)


def test_input_dropout_drops_the_students_pixels_while_the_teacher_judges_them_whole():
    torch.manual_seed(0)
    x, y = torch.rand(64, 784) + 0.5, torch.randint(0, 10, (64,))  # no pixel is zero before dropout
    teacher, student = models.mnist_mlp((784, 8, 10)), models.mnist_mlp((784, 8, 10))
    seen = []
    teacher.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].clone()))
    student.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].clone()) if module.training
                                  else None)
    training.train(student, (x, y), epochs=1, batch_size=32, teacher=teacher, shift=1, input_dropout=0.5)
    teacher_seen, student_seen = seen[0], seen[1]
    dropped = student_seen == 0
    assert 0.4 < dropped.float().mean() < 0.6  # shifting alone zeroes at most a row and a column
    assert torch.equal(student_seen[~dropped], 2 * teacher_seen[~dropped])  # the teacher saw the same images whole


def test_input_dropout_of_zero_trains_exactly_as_before_and_any_other_differently():
    torch.manual_seed(0)
    x, y = torch.rand(64, 784), torch.randint(0, 10, (64,))
    models_ = [models.mnist_mlp((784, 8, 10)) for _ in range(3)]
    for m in models_[1:]:
        m.load_state_dict(models_[0].state_dict())
    for m, p in zip(models_, (None, 0.0, 0.1)):
        training.train(m, (x, y), epochs=2, batch_size=16, **({} if p is None else {"input_dropout": p}))
    a, b, c = (list(m.parameters()) for m in models_)
    assert all(torch.equal(p, q) for p, q in zip(a, b)) and not torch.equal(a[0], c[0])


def test_a_shift_of_zero_trains_exactly_as_before():
    torch.manual_seed(0)
    x, y = torch.rand(64, 784), torch.randint(0, 10, (64,))
    a, b = models.mnist_mlp((784, 8, 10)), models.mnist_mlp((784, 8, 10))
    b.load_state_dict(a.state_dict())
    training.train(a, (x, y), epochs=2, batch_size=16)
    training.train(b, (x, y), epochs=2, batch_size=16, shift=0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_logits_are_the_models_outputs_in_order_in_eval_mode_whatever_the_batch():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.9), nn.Linear(4, 2))  # dropout: only eval mode is exact
    x = torch.arange(21.0).reshape(7, 3)
    with torch.no_grad():
        expected = model.eval()(x)
    model.train()
    for batch_size in (1, 3, 7, 500):
        assert torch.allclose(training.logits(model, x, batch_size), expected, atol=1e-6)
    assert model.training  # left as it was found
