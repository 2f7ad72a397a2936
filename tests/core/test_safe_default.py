"""The safe default (issue 30): `reinit_when="fitted"` on every path, a head RIFLE did not draw on the backbone's
learning rate (so a run whose every planned re-init is skipped is plain fine-tuning), no re-draw with under 8 epochs
left, and a resumed run on the schedule it started with, real training throughout."""

import inspect
import logging
import math

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_rifle import RifleConfig, RifleTrainer, RifleTrainerCallback, attach
from hf_rifle.attach import STATE_KEY
from hf_rifle.fit import FitDecision, decide_redraw, late_redraw_steps

from ..helpers import RandomImages, TinyClassifier, fit_batch, timm_wrapper_resnet, tiny_run_settings
from .test_fit import MAX_STEPS, run, saved
from .test_trainer import Recorder


def test_fitted_is_the_default_of_every_path():
    assert RifleConfig(output_dir="out").reinit_when == "fitted"
    for path in (RifleTrainerCallback, attach):
        assert inspect.signature(path).parameters["reinit_when"].default == "fitted"


def test_a_run_whose_every_reinit_is_skipped_is_plain_fine_tuning_bit_for_bit():
    """Labels independent of the inputs: no head fits, both planned re-inits (steps 10, 20) keep it. The attached run
    is the same run never attached (plain SGD, no rescaling), to the last bit."""
    model, _, rifle = run("fitted", signal=0.0)
    assert [(d.step, d.redrawn) for d in rifle.decisions] == [(10, False), (20, False)]

    plain, _, _ = run(None, signal=0.0)
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("path", ["callback", "rifle_trainer"])
def test_a_kept_heads_learning_rate_read_back_from_the_optimizer_is_the_backbones(tmp_path, path):
    """Random images and labels that a tiny ResNet cannot fit in 9 steps: both re-inits kept. The head is on the
    backbone's learning rate throughout, as the optimizer holds it at each update and as logged."""
    model = timm_wrapper_resnet()
    recorder = Recorder(model)
    settings = tiny_run_settings(tmp_path, learning_rate=0.1, optim_args=None)
    if path == "rifle_trainer":
        trainer = RifleTrainer(model=model, args=RifleConfig(**settings), train_dataset=RandomImages())
        rifle = trainer.rifle
    else:
        rifle = RifleTrainerCallback()
        trainer = Trainer(model=model, args=TrainingArguments(**settings), train_dataset=RandomImages())
        trainer.add_callback(rifle)
    trainer.add_callback(recorder)
    trainer.train()
    assert [d.redrawn for d in rifle.handle.decisions] == [False, False]
    logged = {entry["step"]: entry["head_learning_rate"] for entry in trainer.state.log_history if "loss" in entry}
    for record in recorder.steps:
        step, backbone_lr = record["step"], record["backbone_lr"][0]
        assert backbone_lr == pytest.approx(0.1 * (1 + math.cos(math.pi * step / 9)) / 2, abs=1e-15)
        if path == "rifle_trainer":  # the head's groups of its own
            assert record["head_lr"] == [backbone_lr] * len(record["head_lr"])
        if step in logged:  # logged after the update of step - 1: the learning rate of this one
            assert logged[step] == backbone_lr


def test_no_head_is_redrawn_with_fewer_than_8_epochs_left_and_the_boundary_is_redrawn():
    # 24 epochs of 10 steps: K = 3 re-draws at 160 with 80 steps (8 epochs) left; K = 5's last at 192, 48 left.
    assert late_redraw_steps(240, 24) == 80 and late_redraw_steps(240, None) == 0
    assert decide_redraw("fitted", 0.1, head_age=80, steps_left=80, min_steps_left=80)
    assert not decide_redraw("fitted", 0.1, head_age=48, steps_left=48, min_steps_left=80)
    assert decide_redraw("always", 0.1, head_age=48, steps_left=48, min_steps_left=80)  # the paper's: every one
    late = FitDecision(192, 5, 0.1, 48, 240, redrawn=False, min_steps_left=80)
    assert late.describe(5, "fitted").endswith(
        "but a new head would have 48 steps left, under 8 epochs (80 steps), too few to fit and pay off."
    )


@pytest.mark.parametrize(("epochs", "redrawn"), [(24, [True, True]), (23, [True, False])])
def test_the_late_redraw_guard_holds_at_its_boundary_in_a_real_run(epochs, redrawn):
    """A head that fits within a few steps, 30 steps, re-inits planned at 10 and 20 (10 steps left). Told the run
    is 24 epochs, 8 epochs are exactly 10 steps: re-drawn. At 23 epochs they are 11 steps: kept."""
    model = TinyClassifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rifle = attach(model, optimizer, MAX_STEPS, num_train_epochs=epochs)
    for step in range(MAX_STEPS):
        inputs, labels = fit_batch(step, 8.0)
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(d.fit for d in rifle.decisions)
    assert [d.redrawn for d in rifle.decisions] == redrawn


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "saved-before-it-was-recorded"])
def test_a_checkpoint_of_an_always_run_resumes_as_always_bit_for_bit(caplog, recorded):
    """An "always" run saved at step 5, resumed by a loop that attaches with the default ("fitted"): it keeps
    "always" (a state from before the schedule was recorded is an "always" run) and ends on the uninterrupted
    run's weights, every head re-drawn although none fits."""
    full_model, _, full = run("always", signal=0.0)
    first_model, first_optimizer, _ = run("always", signal=0.0, steps=range(5))
    state = saved(first_model, first_optimizer)
    for group in state["optimizer"]["param_groups"]:
        assert group[STATE_KEY]["reinit_when"] == "always"
        if not recorded:
            del group[STATE_KEY]["reinit_when"]
    with caplog.at_level(logging.INFO, logger="hf_rifle"):
        model, _, resumed = run("fitted", signal=0.0, steps=range(5, MAX_STEPS), state=state)
    assert resumed.reinit_when == "always"
    assert [d.redrawn for d in resumed.decisions] == [True, True] and resumed.decisions == full.decisions
    for a, b in zip(model.parameters(), full_model.parameters()):
        assert torch.equal(a, b)
    said = [r for r in caplog.records if "resumes with it" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert "started with reinit_when='always' and resumes with it (asked: 'fitted')" in said[0].getMessage()


def test_only_a_head_rifle_redrew_gets_the_cyclic_cosine():
    """A head that fits within a few steps: re-drawn at 10 and 20. Its learning rate, read after each update, is the
    optimizer's (the backbone's) in the first period and the cosine restarted with each re-drawn head after it."""
    model = TinyClassifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rifle = attach(model, optimizer, MAX_STEPS)
    for step in range(MAX_STEPS):
        inputs, labels = fit_batch(step, 8.0)
        nn.functional.cross_entropy(model(inputs), labels).backward()
        head_lr = rifle.head_learning_rate
        expected = 0.1 if step < 10 else 0.1 * (1 + math.cos(math.pi * (step % 10) / 10)) / 2
        assert head_lr == pytest.approx(expected, abs=1e-15), step
        optimizer.step()
        optimizer.zero_grad()
    assert [d.redrawn for d in rifle.decisions] == [True, True]


def test_a_head_group_of_its_own_keeps_its_own_peak_on_the_backbones_schedule():
    """A loop that gives the head 10x the backbone's learning rate in a group of its own ({"rifle_head": True}): a
    head RIFLE did not draw follows the backbone's schedule at its own peak, as it would without RIFLE."""
    model = TinyClassifier()
    head = [p for name, p in model.named_parameters() if name.startswith("fc")]
    body = [p for name, p in model.named_parameters() if not name.startswith("fc")]
    optimizer = torch.optim.SGD(
        [{"params": body, "lr": 0.01}, {"params": head, "lr": 0.1, "rifle_head": True}], lr=0.01, momentum=0.9
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=MAX_STEPS)
    rifle = attach(model, optimizer, MAX_STEPS)
    for step in range(MAX_STEPS):
        inputs, labels = fit_batch(step, 0.0)
        nn.functional.cross_entropy(model(inputs), labels).backward()
        backbone_lr, head_lr = (group["lr"] for group in optimizer.param_groups)
        assert head_lr == pytest.approx(10 * backbone_lr, rel=1e-12) and rifle.head_learning_rate == head_lr
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    assert [d.redrawn for d in rifle.decisions] == [False, False]
