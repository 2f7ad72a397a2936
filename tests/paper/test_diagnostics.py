"""Figures 1 and 2 of the paper: probe layers, gradient norms logged by a real run, weight distances, plots."""

import json
import math

import pytest
import timm
import torch
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification, TrainerCallback

from hf_rifle import RifleConfig, RifleTrainer, find_head
from hf_rifle.paper.diagnostics import (
    GRAD_NORM_PREFIX,
    HEAD_FIT_KEY,
    GradientNormCallback,
    _step_to_epoch,
    default_probe_layers,
    gradient_norm_table,
    gradient_norms_by_period,
    mean_over_runs,
    plot_accuracy_curves,
    plot_gradient_norms,
    weight_distance_from_pretrained,
)

from ..helpers import RandomImages, StopAt, native_resnet, timm_wrapper_resnet

FAST = dict(report_to="none", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
WRAPPER_PROBES = [f"timm_model.layer{k}.0.conv2" for k in range(1, 5)]


# --- Probe layers ----------------------------------------------------------------------------------------


def test_probe_layers_are_the_last_3x3_conv_of_each_stage():
    assert default_probe_layers(timm_wrapper_resnet()) == WRAPPER_PROBES  # BasicBlock and Bottleneck stages mixed
    assert default_probe_layers(timm.create_model("resnet18")) == [f"layer{k}.1.conv2" for k in range(1, 5)]
    assert default_probe_layers(native_resnet()) == [
        f"resnet.encoder.stages.{k}.layers.0.layer.1.convolution"
        for k in range(2)  # 1x1, 3x3, 1x1 bottleneck
    ]
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 1], layer_type="basic")
    basic = ResNetForImageClassification(config)
    assert default_probe_layers(basic) == [
        "resnet.encoder.stages.0.layers.1.layer.1.convolution",
        "resnet.encoder.stages.1.layers.0.layer.1.convolution",
    ]
    model = timm_wrapper_resnet()
    assert all(model.get_submodule(name).kernel_size == (3, 3) for name in default_probe_layers(model))


def test_probe_layers_of_an_unknown_model_ask_for_names():
    with pytest.raises(ValueError, match=r"layers=\["):
        default_probe_layers(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))


# --- Gradient norms from a real run ----------------------------------------------------------------------


class GradientCopies(TrainerCallback):
    """Every step's gradients of the probed weights, read in the same Trainer event as the callback."""

    def __init__(self, layers):
        self.layers = layers
        self.steps = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps[state.global_step] = {
            layer: model.get_submodule(layer).weight.grad.detach().clone() for layer in self.layers
        }


def grad_norm_entries(log_history):
    return [entry for entry in log_history if any(key.startswith(GRAD_NORM_PREFIX) for key in entry)]


def rifle_a_config(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_train_epochs=2,
        num_periods=2,
        head_lr_schedule="trainer",
        optim="sgd",
        learning_rate=0.05,
        seed=0,
        save_strategy="no",
        **FAST,
    )
    return RifleConfig(**{**settings, **overrides})


def test_gradient_norms_are_logged_once_per_epoch_per_layer_and_equal_the_frobenius_norm(tmp_path):
    copies = GradientCopies(WRAPPER_PROBES)
    trainer = RifleTrainer(
        model=timm_wrapper_resnet(),
        args=rifle_a_config(tmp_path),
        train_dataset=RandomImages(),
        callbacks=[GradientNormCallback(), copies],
    )
    trainer.train()  # 16 images, batch 4: 4 steps per epoch, 2 epochs

    entries = grad_norm_entries(trainer.state.log_history)
    assert [(entry["epoch"], entry["step"], entry["grad_norm_steps"]) for entry in entries] == [
        (0.0, 0, 4),
        (1.0, 4, 4),
    ]
    for entry in entries:
        expected_keys = ["epoch", "step", "grad_norm_steps", HEAD_FIT_KEY]
        expected_keys += [GRAD_NORM_PREFIX + layer for layer in WRAPPER_PROBES]
        assert sorted(entry) == sorted(expected_keys)
        assert 0 < entry[HEAD_FIT_KEY] <= 1  # the head's top-class loss over a uniform guess's: the fit statistic
        for layer in WRAPPER_PROBES:
            value = entry[GRAD_NORM_PREFIX + layer]
            norms = [
                copies.steps[step][layer].pow(2).sum().sqrt().item() for step in range(entry["step"], entry["step"] + 4)
            ]
            assert math.isfinite(value) and value > 0
            assert value == pytest.approx(sum(norms) / 4, rel=1e-5)  # the mean over the epoch's steps
    trainer.state.save_to_json(str(tmp_path / "trainer_state.json"))
    saved = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    assert grad_norm_entries(saved) == entries


def test_gradient_norms_survive_a_resume_mid_epoch(tmp_path):
    def trainer(output_dir, *callbacks, **overrides):
        args = rifle_a_config(output_dir, num_train_epochs=3, num_periods=3, **overrides)
        probe = GradientNormCallback(layers=["timm_model.layer4.0.conv2"])
        return RifleTrainer(
            model=timm_wrapper_resnet(), args=args, train_dataset=RandomImages(), callbacks=[probe, *callbacks]
        )

    uninterrupted = trainer(tmp_path / "uninterrupted")
    uninterrupted.train()
    checkpoints = dict(save_strategy="steps", save_steps=6)
    interrupted = trainer(tmp_path / "split", StopAt(6), **checkpoints)  # 4 steps per epoch: mid-epoch 1
    interrupted.train()
    assert [e["grad_norm_steps"] for e in grad_norm_entries(interrupted.state.log_history)] == [4, 2]
    resumed = trainer(tmp_path / "split", **checkpoints)
    resumed.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-6"))
    entries = grad_norm_entries(resumed.state.log_history)
    assert [(e["epoch"], e["step"], e["grad_norm_steps"]) for e in entries] == [(0.0, 0, 4), (1.0, 4, 4), (2.0, 8, 4)]
    # epoch 1's running mean carried its first two steps through the checkpoint
    for entry, expected in zip(entries, grad_norm_entries(uninterrupted.state.log_history), strict=True):
        assert entry == pytest.approx(expected, rel=1e-6)


def test_gradient_norm_callback_rejects_unknown_layers_before_training(tmp_path):
    trainer = RifleTrainer(
        model=timm_wrapper_resnet(),
        args=rifle_a_config(tmp_path),
        train_dataset=RandomImages(),
        callbacks=[GradientNormCallback(layers=["timm_model.layer9"])],
    )
    with pytest.raises(ValueError, match="Cannot probe 'timm_model.layer9'"):
        trainer.train()


# --- Weight distance -------------------------------------------------------------------------------------


def test_weight_distance_is_zero_untouched_and_exact_for_a_known_perturbation():
    model = timm_wrapper_resnet()
    with torch.no_grad():
        model.timm_model.layer1[0].bn2.weight.zero_()  # a pretrained tensor of zeros (as timm's zero_init_last)
    pretrained = {name: value.clone() for name, value in model.state_dict().items()}
    head_name, _ = find_head(model)

    distances = weight_distance_from_pretrained(model, pretrained)
    names = [n for n, _ in model.named_parameters() if not n.startswith(head_name + ".")]
    assert sorted(distances) == sorted(
        f"{kind}/{n}" for kind in ("weight_distance", "relative_weight_distance") for n in names
    )
    assert set(distances.values()) == {0.0}

    with torch.no_grad():
        weight = model.get_submodule("timm_model.layer1.0.conv1").weight
        delta = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.01
        weight += delta
        model.timm_model.fc.weight.add_(1.0)  # the head is re-drawn by RIFLE: never measured
        model.timm_model.layer1[0].bn2.weight.add_(0.5)  # moved away from zero: relative distance inf
    distances = weight_distance_from_pretrained(model, pretrained)
    name = "timm_model.layer1.0.conv1.weight"
    assert distances[f"weight_distance/{name}"] == pytest.approx(delta.norm().item(), rel=1e-4)
    assert distances[f"relative_weight_distance/{name}"] == pytest.approx(
        delta.norm().item() / pretrained[name].norm().item(), rel=1e-4
    )
    assert distances["relative_weight_distance/timm_model.layer1.0.bn2.weight"] == math.inf
    moved = {key for key, value in distances.items() if value > 0}
    assert moved == {
        f"{kind}/{n}"
        for kind in ("weight_distance", "relative_weight_distance")
        for n in (name, "timm_model.layer1.0.bn2.weight")
    }

    with pytest.raises(KeyError, match="not in pretrained_state_dict"):
        weight_distance_from_pretrained(model, {k.removeprefix("timm_model."): v for k, v in pretrained.items()})


# --- Plots -----------------------------------------------------------------------------------------------


def synthetic_history(epochs=6, steps_per_epoch=10, train_accuracy=False, shift=0.0):
    history = []
    for epoch in range(1, epochs + 1):
        history.append(
            {"loss": 1.0 / epoch + shift, "epoch": epoch - 0.5, "step": int((epoch - 0.5) * steps_per_epoch)}
        )
        history.append(
            {f"{GRAD_NORM_PREFIX}layer{k}.1.conv2": k / epoch for k in range(1, 5)}
            | {"epoch": float(epoch - 1), "step": (epoch - 1) * steps_per_epoch}
        )
        entry = {
            "eval_accuracy": 0.5 + 0.05 * epoch - shift,
            "test_accuracy": 0.45 + 0.05 * epoch,
            "epoch": float(epoch),
            "step": epoch * steps_per_epoch,
        }
        if train_accuracy:
            entry["train_accuracy"] = 0.6 + 0.05 * epoch
        history.append(entry)
    return history


def is_png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.parametrize("train_accuracy", [False, True], ids=["loss", "train-accuracy"])
def test_accuracy_curves_plot_writes_a_png(tmp_path, train_accuracy):
    runs = {
        "L2": synthetic_history(train_accuracy=train_accuracy),
        "RIFLE": synthetic_history(train_accuracy=train_accuracy, shift=0.1),
    }
    path = plot_accuracy_curves(runs, {"RIFLE": [20, 40]}, tmp_path / "figure1.png")
    assert is_png(path)
    assert _step_to_epoch(runs["RIFLE"], [20, 25]) == [2.0, 2.5]


def test_gradient_norm_plot_writes_a_png_from_a_real_run_and_refuses_runs_without_norms(tmp_path):
    trainer = RifleTrainer(
        model=timm_wrapper_resnet(),
        args=rifle_a_config(tmp_path),
        train_dataset=RandomImages(),
        callbacks=[GradientNormCallback()],
    )
    trainer.train()
    assert is_png(plot_gradient_norms({"RIFLE-A": trainer.state.log_history}, tmp_path / "figure2.png"))
    synthetic = {"a": synthetic_history(), "b": synthetic_history(shift=0.1)}
    assert is_png(plot_gradient_norms(synthetic, tmp_path / "log.png", log_scale=True))
    seeds = {"a": [synthetic_history(), synthetic_history(shift=0.2)], "b": [synthetic_history(shift=0.1)]}
    assert is_png(plot_gradient_norms(seeds, tmp_path / "seeds.png"))
    with pytest.raises(ValueError, match="GradientNormCallback"):
        plot_gradient_norms({"plain": [{"loss": 1.0, "epoch": 1.0, "step": 1}]}, tmp_path / "none.png")


def test_mean_over_runs_gives_the_per_epoch_mean_and_a_t_interval():
    runs = [[{"epoch": 0.0, "g": 1.0}, {"epoch": 1.0, "g": 2.0}], [{"epoch": 0.0, "g": 3.0}, {"epoch": 1.0, "g": 2.0}]]
    epochs, means, lows, highs = mean_over_runs(runs, "g")
    assert epochs == [0.0, 1.0] and means == [2.0, 2.0]
    assert lows[0] == pytest.approx(2.0 - 12.706 * 1.0, rel=1e-3) and lows[1] == highs[1] == 2.0


def test_gradient_norms_by_period_pairs_seeds_and_averages_each_period():
    def history(norms_per_epoch):  # one GradientNormCallback entry per epoch of 10 steps
        return [
            {"epoch": float(e), "step": 10 * e, "grad_norm_steps": 10, "grad_norm/stage": norm}
            for e, norm in enumerate(norms_per_epoch)
        ]

    original = {1: history([1, 1, 1, 1]), 2: history([2, 2, 2, 2])}
    rifle = {1: history([1, 1, 2, 2]), 2: history([2, 2, 6, 6])}  # twice and three times Original after step 20
    rows = gradient_norms_by_period(original, rifle, period_starts=[0, 20])
    assert [(row["period"], row["baseline"], row["compared"]) for row in rows] == [(1, 1.5, 1.5), (2, 1.5, 4.0)]
    assert rows[0]["ratio"] == 1.0 and rows[0]["seeds_higher"] == 0
    assert rows[1]["ratio"] == 2.5 and rows[1]["seeds_higher"] == 2
    assert rows[1]["ratio_ci95"][0] == pytest.approx(2.5 - 12.706 * 0.5, rel=1e-3)
    assert "| stage | 2 | 2 | 1.5 | 4 | 2.50 [" in gradient_norm_table(rows)


def test_the_papers_figures_leave_the_callers_plotting_backend_and_open_no_pyplot_figure(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    found = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        open_figures = plt.get_fignums()
        assert is_png(plot_accuracy_curves({"L2": synthetic_history()}, None, tmp_path / "figure1.png"))
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == open_figures
    finally:
        matplotlib.use(found)
