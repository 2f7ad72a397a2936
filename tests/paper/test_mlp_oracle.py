"""The MLP-oracle study (hf_rifle/paper/mlp_oracle.py): the OT distance, RIFLE's head re-draws and learning
rates, and a reduced run."""

import json
import math

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from hf_rifle import cyclic_cosine_factor, head_seed, reinit_head_, reinit_steps


@pytest.fixture(scope="module")
def study():
    from hf_rifle.paper import mlp_oracle

    return mlp_oracle


def random_first_layer(seed: int) -> torch.Tensor:
    return torch.randn(100, 50, generator=torch.Generator().manual_seed(seed))


def test_ot_distance_ignores_unit_order_and_positive_scale(study):
    oracle, draw = random_first_layer(0), torch.Generator().manual_seed(1)
    permuted_and_rescaled = oracle[:, torch.randperm(50, generator=draw)] * torch.rand(50, generator=draw).add(0.5)
    assert study.ot_distance(oracle, oracle) == pytest.approx(0.0, abs=1e-9)
    assert study.ot_distance(permuted_and_rescaled, oracle) == pytest.approx(0.0, abs=1e-6)


def test_ot_distance_is_the_mean_distance_of_the_best_matching(study):
    learned, oracle = random_first_layer(1), random_first_layer(2)
    learned_units, oracle_units = ((w / w.norm(dim=0)).T for w in (learned.double(), oracle.double()))
    cost = torch.cdist(learned_units, oracle_units).numpy()
    rows, columns = linear_sum_assignment(cost)
    distance = study.ot_distance(learned, oracle)
    assert distance > 0.5
    assert distance == pytest.approx(cost[rows, columns].mean(), rel=1e-9)


def tiny_target(study, n: int = 64):
    oracles = study.make_oracles(0)
    return study.sample(oracles.first_layer, oracles.target_head, n, 0.1, torch.Generator().manual_seed(0))


def record_head_weights(model) -> list[torch.Tensor]:
    """The head's weight as each training step sees it (one forward per step)."""
    seen = []
    model.head.register_forward_pre_hook(lambda module, args: seen.append(module.weight.detach().clone()))
    return seen


@pytest.mark.parametrize("num_periods", [3, 4])
def test_rifle_redraws_the_head_exactly_at_period_starts(study, num_periods):
    x, y = tiny_target(study)
    seed, epochs, batch_size = 7, 6, 16
    max_steps = epochs * math.ceil(len(x) / batch_size)
    model = study.new_mlp(seed)
    first_layer, teacher_head = model.hidden.weight.detach().clone(), model.head.weight.detach().clone()
    seen = record_head_weights(model)

    # lr 0 freezes every weight, so the head can only change by a re-draw.
    study.train_mlp(model, x, y, epochs, 0.0, 0.0, num_periods, seed, batch_size)

    assert len(seen) == max_steps
    changed_at = [step for step in range(1, max_steps) if not torch.equal(seen[step], seen[step - 1])]
    assert changed_at == reinit_steps(max_steps, num_periods)
    assert torch.equal(seen[0], teacher_head)
    for period, step in enumerate(changed_at, start=1):
        expected = nn.Linear(50, 1, bias=False)
        reinit_head_(expected, head_seed(seed, period))
        assert torch.equal(seen[step], expected.weight)
    assert torch.equal(model.hidden.weight, first_layer)


def test_fine_tuning_without_rifle_never_redraws_the_head(study):
    x, y = tiny_target(study)
    model = study.new_mlp(0)
    seen = record_head_weights(model)
    study.train_mlp(model, x, y, 4, 0.0, 0.0, None, 0, 16)
    assert all(torch.equal(weight, seen[0]) for weight in seen)


def test_head_follows_the_cyclic_cosine_and_the_first_layer_one_cosine(study, monkeypatch):
    x, y = tiny_target(study)
    epochs, batch_size, num_periods, lr = 5, 16, 4, 0.1
    max_steps = epochs * math.ceil(len(x) / batch_size)
    learning_rates = []
    sgd_step = torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        learning_rates.append([group["lr"] for group in self.param_groups])
        return sgd_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    study.train_mlp(study.new_mlp(0), x, y, epochs, lr, 1e-3, num_periods, 0, batch_size)
    expected = [
        (lr * cyclic_cosine_factor(step, max_steps, 1), lr * cyclic_cosine_factor(step, max_steps, num_periods))
        for step in range(max_steps)
    ]
    assert [tuple(pair) for pair in learning_rates] == expected


def test_a_seed_reproduces_its_results(study):
    config = study.StudyConfig(num_train=64, num_test=64, teacher_epochs=2, epochs=3)
    assert study.run_seed(3, config) == study.run_seed(3, config)


def test_reduced_run_writes_finite_results(study, tmp_path, capsys):
    output_json, output_md = tmp_path / "results.json", tmp_path / "results.md"
    argv = [
        "--seeds",
        "2",
        "--teacher_epochs",
        "3",
        "--epochs",
        "3",
        "--num_test",
        "500",
        "--output_json",
        str(output_json),
        "--output_md",
        str(output_md),
    ]
    threads = torch.get_num_threads()
    try:
        study.main(argv)
    finally:
        torch.set_num_threads(threads)

    report = json.loads(output_json.read_text())
    assert set(report) == {"config", "seeds", "paper", "summary", "rifle_minus_l2", "per_seed", "runtime_s"}
    assert report["seeds"] == [0, 1] and len(report["per_seed"]) == 2
    assert report["config"]["num_periods"] == 3 and report["config"]["epochs"] == 3
    assert set(report["summary"]) == {"random_init", "teacher", "l2", "l2_rifle"}
    for method in ("l2", "l2_rifle"):
        assert set(report["summary"][method]) == {"train_mse", "test_mse", "relative_test_mse", "ot_distance"}
    assert set(report["rifle_minus_l2"]) == {"test_mse", "ot_distance"}
    values = [
        statistic
        for metrics in report["summary"].values()
        for summary in metrics.values()
        for statistic in summary.values()
    ]
    assert all(math.isfinite(value) for value in values)
    table = output_md.read_text()
    assert "| L2 + RIFLE |" in table and table in capsys.readouterr().out
