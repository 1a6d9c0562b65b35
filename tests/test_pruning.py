"""Unit tests on tiny models whose answers can be worked out by hand."""

import argparse

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

import activation_pruning as ap
import common
import zero_pruning as zp


def tiny(sizes, weights, biases):
    model = common.mlp(sizes)
    with torch.no_grad():
        for layer, w, b in zip(common.linears(model), weights, biases):
            layer.weight.copy_(torch.tensor(w))
            layer.bias.copy_(torch.tensor(b))
    return model


def test_the_mlp_has_the_documented_size():
    model = common.mlp()
    assert common.count_weights(model) == 784 * 512 + 512 * 256 + 256 * 128 + 128 * 10 == 566_528
    assert common.count_params(model) == 566_528 + 512 + 256 + 128 + 10 == 567_434
    assert common.widths(model) == (784, 512, 256, 128, 10)


# Zero pruning -------------------------------------------------------------------------

def zero_model():
    return tiny([2, 2, 1], [[[0.5, -0.0625], [0.125, -0.375]], [[0.03125, 1.0]]], [[0.25, -0.5], [0.0]])


def test_zero_pruning_zeroes_weights_strictly_below_the_threshold_and_no_bias():
    pruned = zp.make_permanent(zp.prune_below(zero_model(), 0.125))
    first, second = common.linears(pruned)
    assert first.weight.tolist() == [[0.5, 0.0], [0.125, -0.375]]  # |0.125| is not < 0.125
    assert second.weight.tolist() == [[0.0, 1.0]]
    assert zp.count_zeros(pruned) == 2
    assert first.bias.tolist() == [0.25, -0.5]


def test_zero_pruning_at_threshold_zero_changes_nothing():
    model = zero_model()
    pruned = zp.make_permanent(zp.prune_below(model, 0.0))
    assert zp.count_zeros(pruned) == 0
    state = pruned.state_dict()
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_threshold_for_sparsity_zeroes_exactly_that_fraction():
    model = zero_model()  # magnitudes 0.03125 0.0625 0.125 0.375 0.5 1.0
    for sparsity, zeros in [(0, 0), (1 / 6, 1), (0.5, 3), (5 / 6, 5)]:
        t = zp.threshold_for_sparsity(model, sparsity)
        assert zp.count_zeros(zp.make_permanent(zp.prune_below(model, t))) == zeros


def test_fine_tuning_keeps_pruned_weights_at_exactly_zero_after_every_step():
    torch.manual_seed(0)
    model = common.mlp([6, 5, 4, 3])
    pruned = zp.prune_below(model, 0.2)
    masks = [layer.weight_mask.bool() for layer in common.linears(pruned)]
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    steps = []

    def check(optimizer, args, kwargs):
        pruned(x[:1])  # the forward pass recomputes each weight from weight_orig and its mask
        steps.append(all((layer.weight[~m] == 0).all() for layer, m in zip(common.linears(pruned), masks)))

    handle = register_optimizer_step_post_hook(check)
    try:
        common.train(pruned, (x, y), epochs=2, lr=0.1, batch_size=8, seed=0)
    finally:
        handle.remove()
    assert len(steps) == 10 and all(steps)
    zp.make_permanent(pruned)
    for layer, m in zip(common.linears(pruned), masks):
        assert (layer.weight[~m] == 0).all() and (layer.weight[m] != 0).all()


def test_cubic_schedule_by_hand():
    # s_k = 0.8 (1 - (1 - k/4)^3): 0.8 * 37/64, 0.8 * 7/8, 0.8 * 63/64, 0.8
    assert common.cubic_schedule(0.8, 4) == pytest.approx([0.4625, 0.7, 0.7875, 0.8])
    assert common.cubic_schedule(0.985, 1) == [0.985]


def test_magnitude_ranking_is_global_across_layers():
    # magnitudes: layer 1 holds 0.5 0.0625 0.125 0.375, layer 2 holds 0.03125 1.0; the three
    # smallest overall are in both layers, though layer 2 is the smaller layer
    model = zero_model()
    pruned = zp.make_permanent(zp.prune_below(model, zp.threshold_for_sparsity(model, 0.5)))
    first, second = common.linears(pruned)
    assert first.weight.tolist() == [[0.5, 0.0], [0.0, -0.375]]
    assert second.weight.tolist() == [[0.0, 1.0]]


def test_pruning_in_steps_holds_every_pruned_weight_at_zero_after_every_optimiser_step():
    torch.manual_seed(0)
    model = common.mlp([6, 5, 4, 3])
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    zeros_per_step, held = [], []

    def finetune(pruned, step):
        masks = [layer.weight_mask.bool() for layer in common.linears(pruned)]
        zeros_per_step.append(sum((~m).sum().item() for m in masks))

        def check(optimizer, args, kwargs):
            pruned(x[:1])  # the forward pass recomputes each weight from weight_orig and its mask
            held.append(all((layer.weight[~m] == 0).all() for layer, m in zip(common.linears(pruned), masks)))

        handle = register_optimizer_step_post_hook(check)
        try:
            common.train(pruned, (x, y), epochs=1, lr=0.1, batch_size=8, seed=step)
        finally:
            handle.remove()

    pruned = zp.prune_in_steps(model, 0.5, 3, finetune)
    weights = common.count_weights(model)  # 6*5 + 5*4 + 4*3 = 62
    assert zeros_per_step == [round(s * weights) for s in common.cubic_schedule(0.5, 3)] == [22, 30, 31]
    assert len(held) == 3 * 5 and all(held)
    assert zp.count_zeros(zp.make_permanent(pruned)) == 31
    assert zp.count_zeros(model) == 0  # the dense model is left as it was


def test_distillation_loss_is_cross_entropy_at_weight_zero_and_kl_at_weight_one():
    torch.manual_seed(0)
    logits, teacher, labels = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    ce = F.cross_entropy(logits, labels)
    assert torch.equal(common.distillation_loss(logits, labels, teacher, 4.0, 0.0), ce)
    assert torch.equal(common.distillation_loss(logits, labels, None, 4.0, 0.5), ce)
    # at weight 1 only the teacher counts: T^2 KL(softmax(t/T) || softmax(s/T)), zero for the teacher itself
    p, log_q = F.softmax(teacher / 2, 1), F.log_softmax(logits / 2, 1)
    kl = (p * (p.log() - log_q)).sum(1).mean()
    assert common.distillation_loss(logits, labels, teacher, 2.0, 1.0).item() == pytest.approx(4 * kl.item())
    assert common.distillation_loss(teacher, labels, teacher, 2.0, 1.0).item() == pytest.approx(0, abs=1e-6)


def test_the_mlp_takes_the_hidden_widths_asked_for():
    args = common.parser("", []).parse_args(["--hidden", "300", "100"])
    model = common.mlp(common.sizes(args))
    assert common.widths(model) == (784, 300, 100, 10)
    assert common.count_weights(model) == 784 * 300 + 300 * 100 + 100 * 10 == 266_200


def test_sparse_file_round_trips_to_identical_predictions(tmp_path):
    torch.manual_seed(0)
    model = common.mlp()
    pruned = zp.make_permanent(zp.prune_below(model, zp.threshold_for_sparsity(model, 0.95)))
    zp.save_sparse(pruned, tmp_path / "m.pt")
    loaded = zp.load_sparse(tmp_path / "m.pt")
    x = torch.randn(64, 784)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
        assert torch.allclose(zp.sparse_forward(pruned)(x), pruned(x), atol=1e-5)


def test_sparse_file_is_within_ten_percent_of_what_csr_needs(tmp_path):
    torch.manual_seed(0)
    model = common.mlp()
    for sparsity in (0.5, 0.9, 0.95, 0.98, 0.99):
        pruned = zp.make_permanent(zp.prune_below(model, zp.threshold_for_sparsity(model, sparsity)))
        size = zp.save_sparse(pruned, tmp_path / "m.pt")
        assert size == (tmp_path / "m.pt").stat().st_size
        assert zp.csr_bytes_needed(pruned) <= size <= 1.10 * zp.csr_bytes_needed(pruned)


def test_sparse_forward_skips_inputs_no_weight_reads():
    model = tiny([2, 2, 1], [[[0.5, 0.0], [-1.0, 0.0]], [[1.0, 2.0]]], [[0.25, 1.0], [0.5]])  # input 2 unused
    x = torch.tensor([[1.0, 7.0], [-2.0, 3.0], [4.0, -1.0]])
    assert zp.sparse_forward(model)(x).flatten().tolist() == [1.25, 6.5, 2.75]


def test_csr_bytes_needed_by_hand():
    pruned = zp.make_permanent(zp.prune_below(zero_model(), 0.125))
    # layer 1: 3 values and column indices, 3 row pointers, 2 biases; layer 2: 1, 2, 1
    assert zp.csr_bytes_needed(pruned) == (8 * 3 + 4 * 3 + 4 * 2) + (8 * 1 + 4 * 2 + 4 * 1)


# Activation pruning -------------------------------------------------------------------

def test_mean_activations_by_hand():
    model = tiny([1, 2, 1], [[[1.0], [-1.0]], [[1.0, 1.0]]], [[0.0, 0.0], [0.0]])
    means = ap.mean_activations(model, torch.tensor([[1.0], [3.0], [-2.0], [2.0]]))
    assert [m.tolist() for m in means] == [[1.5, 0.5]]  # (1 + 3 + 0 + 2) / 4 and (0 + 0 + 2 + 0) / 4


def test_neurons_below_the_threshold_go_and_a_layer_is_never_emptied():
    means = [torch.tensor([0.0, 0.5, 0.2]), torch.tensor([0.1, 0.05])]
    keep, rescued = ap.neurons_to_keep(means, 0.3)
    assert [k.tolist() for k in keep] == [[False, True, False], [True, False]]
    assert rescued == [1]
    keep, rescued = ap.neurons_to_keep(means, 0.0)
    assert all(k.all() for k in keep) and rescued == []


def test_widths_round_up_to_a_multiple_with_the_strongest_neurons_below_the_threshold():
    means = [torch.tensor([0.0, 0.5, 0.2, 0.9, 0.1]), torch.tensor([0.1, 0.05, 0.3])]
    keep, rescued = ap.neurons_to_keep(means, 0.3, multiple=2)
    assert [k.tolist() for k in keep] == [[False, True, False, True, False], [True, False, True]]
    keep, rescued = ap.neurons_to_keep(means, 0.4, multiple=4)
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
    smaller = ap.remove_neurons(model, keep)
    x = torch.tensor([[1.0, -2.0], [0.5, 0.5], [-3.0, 1.0]])
    with torch.no_grad():
        assert torch.equal(smaller(x), model(x))
    assert common.widths(smaller) == (2, 2, 2, 2)
    assert common.count_params(smaller) == (2 * 2 + 2) + (2 * 2 + 2) + (2 * 2 + 2) == 18
    assert common.count_params(model) == (2 * 3 + 3) + (3 * 2 + 2) + (2 * 2 + 2) == 23


def test_threshold_zero_keeps_the_model_unchanged():
    torch.manual_seed(0)
    model = common.mlp([20, 16, 8, 3])
    x = torch.randn(50, 20)
    keep, _ = ap.neurons_to_keep(ap.mean_activations(model, x), 0.0)
    same = ap.remove_neurons(model, keep)
    assert common.count_params(same) == common.count_params(model)
    with torch.no_grad():
        assert torch.equal(same(x), model(x))


def test_rebuilt_layers_have_the_counted_parameters():
    torch.manual_seed(0)
    model = common.mlp([10, 6, 4, 2])
    keep = [torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool), torch.tensor([0, 1, 0, 0], dtype=torch.bool)]
    smaller = ap.remove_neurons(model, keep)
    assert common.widths(smaller) == (10, 3, 1, 2)
    assert common.count_params(smaller) == (10 * 3 + 3) + (3 * 1 + 1) + (1 * 2 + 2) == 41
    assert all(isinstance(m, nn.Linear) for m in common.linears(smaller))
    first = common.linears(smaller)[0]
    assert torch.equal(first.weight, common.linears(model)[0].weight[[0, 2, 3]])


def test_bias_compensation_is_exact_for_a_constant_activation():
    # hidden neuron 1 gets no input and a positive bias: its activation is always 0.75
    model = dead_neuron_model()
    with torch.no_grad():
        common.linears(model)[0].bias[1] = 0.75
    x = torch.tensor([[1.0, -2.0], [0.5, 0.5], [-3.0, 1.0]])
    means = ap.mean_activations(model, x)
    assert means[0][1].item() == 0.75
    keep = [torch.tensor([True, False, True]), torch.tensor([True, True])]
    compensated = ap.remove_neurons(model, keep, means)
    assert common.linears(compensated)[1].bias.tolist() == [0.25 + 5.0 * 0.75, 0.5 - 3.0 * 0.75]
    with torch.no_grad():
        assert torch.allclose(compensated(x), model(x), atol=1e-6)
        assert not torch.allclose(ap.remove_neurons(model, keep)(x), model(x))


def test_removing_a_constant_input_pixel_keeps_every_output_exactly():
    model = dead_neuron_model()  # inputs: pixel 0 varies, pixel 1 is always 0.5
    x = torch.tensor([[1.0, 0.5], [-2.0, 0.5], [0.25, 0.5]])
    strength, means = ap.scores(model, x, "activation")
    assert strength[0].tolist() == [pytest.approx(x[:, 0].std().item()), 0.0] and means[0][1].item() == 0.5
    smaller = ap.remove_neurons(model, [torch.ones(3, dtype=torch.bool), torch.ones(2, dtype=torch.bool)],
                                inputs=(torch.tensor([True, False]), means[0]))
    assert common.widths(smaller) == (1, 3, 2, 2) and common.kept_inputs(smaller).tolist() == [0]
    # the first layer's bias takes the pixel's weights times 0.5: 0.5 + 2 * 0.5, -1 + 0, 0 + 1 * 0.5
    assert common.linears(smaller)[0].bias.tolist() == [1.5, -1.0, 0.5]
    with torch.no_grad():
        assert torch.equal(smaller(x), model(x))


def test_an_input_pruned_model_reads_whole_images_as_the_small_model_reads_its_pixels():
    torch.manual_seed(0)
    model = common.mlp([12, 6, 3])
    x = torch.randn(30, 12)
    keep = torch.tensor([i % 3 == 0 for i in range(12)])
    pruned = ap.remove_neurons(model, [torch.ones(6, dtype=torch.bool)], inputs=(keep, x.mean(0)))
    small = common.mlp([4, 6, 3])
    small.load_state_dict({f"{int(k[0]) - 1}{k[1:]}": v for k, v in pruned.state_dict().items() if k != "0.indices"})
    with torch.no_grad():
        assert torch.equal(pruned(x), small(x[:, [0, 3, 6, 9]]))
    # pruning again keeps indices into the original image, not into the kept pixels
    again = ap.remove_neurons(pruned, [torch.ones(6, dtype=torch.bool)],
                              inputs=(torch.tensor([False, True, True, False]), x[:, [0, 3, 6, 9]].mean(0)))
    assert common.kept_inputs(again).tolist() == [3, 6]


def test_target_widths_scale_every_layer_by_one_factor_to_the_parameter_budget():
    # 784-512-256-128-10 has 567,434 parameters; at half of each width (392-256-128-64-10):
    # 392*256+256 + 256*128+128 + 128*64+64 + 64*10+10 = 100,608 + 32,896 + 8,256 + 650 = 142,410
    assert ap.params_of([784, 512, 256, 128, 10]) == 567_434
    assert ap.params_of([392, 256, 128, 64, 10]) == 142_410
    assert ap.target_widths([784, 512, 256, 128, 10], 142_410, prune_inputs=True) == [392, 256, 128, 64, 10]
    assert ap.target_widths([784, 512, 256, 128, 10], 142_409, prune_inputs=True) == [391, 255, 127, 63, 10]
    # without the inputs only the hidden layers shrink: 784*256+256 + 32,896 + 8,256 + 650 = 242,762 at half
    assert ap.target_widths([784, 512, 256, 128, 10], 242_762, prune_inputs=False) == [784, 256, 128, 64, 10]


def test_shrinking_in_steps_follows_the_cubic_schedule():
    torch.manual_seed(0)
    model = common.mlp([20, 16, 8, 3])
    x = torch.randn(50, 20)
    args = argparse.Namespace(steps=3, criterion="contribution", prune_inputs=True, bias_compensation=False)
    widths = []
    ap.shrink_in_steps(model, 0.6, x, args, lambda pruned, step: widths.append(list(common.widths(pruned))))
    # 0.6 (1 - (1 - k/3)^3) of the 499 parameters (20*16+16 + 16*8+8 + 8*3+3) removed after step k:
    # 0.6 * 19/27, 0.6 * 26/27, 0.6 of them, so at most 288.3, 210.7 and 199.6 left
    assert common.count_params(model) == 499
    budgets = [(1 - r) * 499 for r in common.cubic_schedule(0.6, 3)]
    assert budgets == pytest.approx([288.3, 210.7, 199.6], abs=0.05)
    assert widths == [ap.target_widths([20, 16, 8, 3], budget, prune_inputs=True) for budget in budgets]
    assert all(ap.params_of(w) <= budget for w, budget in zip(widths, budgets))


# Tables -------------------------------------------------------------------------------

def test_markdown_table():
    rows = [{"t": 0.5, "n": 1234}, {"t": 0.25, "n": 5}]
    assert common.markdown_table(rows, [("T", "t", "{:.2f}".format), ("Count", "n", "{:,}".format)]) == (
        "|    T | Count |\n"
        "|-----:|------:|\n"
        "| 0.50 | 1,234 |\n"
        "| 0.25 |     5 |")


def test_rows_over_seeds_hold_means_and_standard_deviations():
    rows = [{"t": 0.5, "acc": 98.0, "widths": [10, 4], "n": 7, "note": [1, "a"], "pixels": [3, 5], "same": [1, 2]},
            {"t": 0.5, "acc": 97.0, "widths": [12, 4], "n": 7, "note": [2, "b"], "pixels": [3, 7], "same": [1, 2]}]
    row = common.mean_row(rows)
    assert row == {"t": 0.5, "acc": 97.5, "acc_std": pytest.approx(0.5 ** 0.5), "widths": [11, 4],
                   "widths_std": [pytest.approx(2 ** 0.5), 0.0], "n": 7, "note": common.VARIES,
                   "pixels": common.VARIES, "same": [1, 2]}
    table = common.markdown_table([row], [("Acc", "acc", "{:.2f}%".format), ("N", "n", "{:,}".format),
                                          ("W", "widths", lambda w: "-".join(f"{x:.0f}" for x in w)),
                                          ("Note", "note", str)])
    assert table.splitlines()[-1] == "| 97.50 ± 0.71% | 7 | 11-4 ± 1-0 | varies |"
