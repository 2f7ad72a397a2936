"""`reinit_when`: the fit test's arithmetic and statistic, and real training in a plain loop with `attach`: a head
that cannot fit is kept under "fitted" and re-drawn under "always", a head that fits is re-drawn under both, and a
run resumed before, at or after a decision ends on the uninterrupted run's weights bit for bit."""

import copy
import io
import logging

import pytest
import torch
from torch import nn

from hf_rifle import RifleConfig, RifleTrainerCallback, reinit_head_at_period_start_
from hf_rifle.attach import DEFAULT_SEED, STATE_KEY, attach
from hf_rifle.fit import FITTED_LOSS_RATIO, FitDecision, decide_redraw, fit_windows, top_class_loss_ratios

from ..helpers import TinyClassifier, fit_batch, learnable_then_random

MAX_STEPS = 30  # K = 3: planned re-inits at steps 10 and 20


def run(reinit_when: str | None, signal, steps=range(MAX_STEPS), state=None):
    """Train from scratch, or from `state` (model and optimizer state dicts, attach called before loading them);
    `reinit_when=None`: plain fine-tuning, never attached. `signal`: `fit_batch`'s, or a function of the step."""
    model = TinyClassifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rifle = attach(model, optimizer, MAX_STEPS, reinit_when=reinit_when) if reinit_when else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    for step in steps:
        inputs, labels = fit_batch(step, signal(step) if callable(signal) else signal)
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer, rifle


def saved(model, optimizer) -> dict:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_the_fit_window_is_the_last_tenth_of_each_period_that_ends_in_a_reinit():
    windows = fit_windows(100, 3)  # periods start at 0, 33, 66
    assert sorted(step for step, reinit in windows.items() if reinit == 33) == [29, 30, 31, 32]
    assert sorted(step for step, reinit in windows.items() if reinit == 66) == [62, 63, 64, 65]
    assert fit_windows(9, 3) == {2: 3, 5: 6}  # at least the period's last step
    assert fit_windows(9, 1) == {}


def test_the_statistic_is_the_top_class_loss_as_a_fraction_of_a_uniform_guesss():
    uniform, confident = torch.zeros(2, 10), torch.tensor([[30.0] + [0.0] * 9])
    torch.testing.assert_close(top_class_loss_ratios(uniform), torch.ones(2))
    assert top_class_loss_ratios(confident).item() < 1e-9
    two_of_four = torch.tensor([[0.0, 0.0, -1e4, -1e4]])  # top class at 1/2: -log(1/2) of log 4
    torch.testing.assert_close(top_class_loss_ratios(two_of_four), torch.tensor([0.5]))
    # It is the cross-entropy when the top class is the label.
    logits = torch.randn(8, 10)
    cross_entropy = torch.nn.functional.cross_entropy(logits, logits.argmax(-1), reduction="none")
    torch.testing.assert_close(top_class_loss_ratios(logits), cross_entropy / torch.log(torch.tensor(10.0)))


def test_fitted_redraws_a_head_that_has_fit_when_the_new_one_gets_as_many_steps_as_it_had():
    assert decide_redraw("always", None, head_age=80, steps_left=10) and decide_redraw("always", 0.99, 80, 10)
    assert decide_redraw("fitted", FITTED_LOSS_RATIO, head_age=80, steps_left=80)
    assert not decide_redraw("fitted", FITTED_LOSS_RATIO + 1e-6, head_age=80, steps_left=160)
    assert not decide_redraw("fitted", 0.0, head_age=160, steps_left=80)  # a kept head that needed 2 periods
    assert not decide_redraw("fitted", None, head_age=80, steps_left=160)


def test_a_head_that_cannot_fit_is_kept_under_fitted_and_redrawn_under_always(caplog):
    with caplog.at_level(logging.WARNING, logger="hf_rifle"):
        _, _, fitted = run("fitted", signal=0.0)
    assert [(d.step, d.redrawn) for d in fitted.decisions] == [(10, False), (20, False)]
    assert all(d.loss_ratio > 0.6 for d in fitted.decisions)  # labels independent of the inputs: near uniform
    kept = [r for r in caplog.records if "kept the head" in r.getMessage()]
    assert len(kept) == 2 and kept[0].getMessage().startswith(
        "RIFLE: kept the head at step 10 of 30: it has not fit yet ("
    )
    assert f"{fitted.decisions[0].loss_ratio:.2f} of a uniform guess's" in kept[0].getMessage()
    assert all(r.levelno == logging.WARNING for r in kept)  # the run is not getting the re-inits it asked for

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_rifle"):
        _, _, always = run("always", signal=0.0)
    assert [(d.step, d.redrawn) for d in always.decisions] == [(10, True), (20, True)]
    assert always.decisions[0].loss_ratio > 0.6
    # A head re-drawn before it fit is what a user should act on: a WARNING, saying that "fitted" would have kept it.
    redrawn = [r for r in caplog.records if "re-initialized the head" in r.getMessage()]
    assert len(redrawn) == 2 and all(r.levelno == logging.WARNING for r in redrawn)
    assert all("reinit_when='fitted' would have kept it" in r.getMessage() for r in redrawn)


def test_a_head_that_fits_within_a_few_steps_is_redrawn_at_the_planned_steps_under_both(caplog):
    """The same re-draws; the runs differ in the first period only, where "fitted" leaves the model's own head on
    the optimizer's learning rate (tests/core/test_safe_default.py). Each is the method working as planned: INFO."""
    with caplog.at_level(logging.INFO, logger="hf_rifle"):
        _, _, always = run("always", signal=8.0)
        _, _, fitted = run("fitted", signal=8.0)
    redrawn = [r for r in caplog.records if "re-initialized the head" in r.getMessage()]
    assert len(redrawn) == 4 and all(r.levelno == logging.INFO for r in redrawn)
    assert [(d.step, d.redrawn) for d in fitted.decisions] == [(10, True), (20, True)]
    assert [(d.step, d.redrawn) for d in always.decisions] == [(10, True), (20, True)]
    assert all(d.loss_ratio < FITTED_LOSS_RATIO for d in fitted.decisions + always.decisions)


def test_always_is_the_papers_schedule_bit_for_bit_whatever_the_statistic():
    """With the statistic's hook removed (reinit_head=False gives none), the re-draws at 10 and 20 by hand give the
    same weights as reinit_when="always"."""
    model, _, _ = run("always", signal=0.0)
    plain = TinyClassifier()
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    attach(plain, optimizer, MAX_STEPS, reinit_head=False)
    for step in range(MAX_STEPS):
        reinit_head_at_period_start_(plain, optimizer, step, MAX_STEPS, 3, seed=DEFAULT_SEED)
        inputs, labels = fit_batch(step, 0.0)
        nn.functional.cross_entropy(plain(inputs), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("stop", [9, 10, 11, 20], ids=["in-the-window", "at-a-decision", "after-it", "at-the-second"])
def test_a_run_resumed_across_a_decision_ends_on_the_uninterrupted_runs_weights(stop):
    full_model, _, full = run("fitted", signal=learnable_then_random)
    assert [d.redrawn for d in full.decisions] == [True, False]
    first_model, first_optimizer, _ = run("fitted", signal=learnable_then_random, steps=range(stop))
    state = saved(first_model, first_optimizer)
    assert "fit" in state["optimizer"]["param_groups"][0][STATE_KEY]
    model, _, resumed = run("fitted", signal=learnable_then_random, steps=range(stop, MAX_STEPS), state=state)
    assert resumed.decisions == full.decisions
    for a, b in zip(model.parameters(), full_model.parameters()):
        assert torch.equal(a, b)


def test_the_decisions_travel_in_the_handles_state_dict():
    _, _, rifle = run("fitted", signal=0.0)
    model = TinyClassifier()
    handle = attach(model, torch.optim.SGD(model.parameters(), lr=0.1), MAX_STEPS, reinit_when="fitted")
    handle.load_state_dict(copy.deepcopy(rifle.state_dict()))
    assert handle.decisions == rifle.decisions and handle.step == MAX_STEPS


def test_reinit_when_is_checked_on_every_path():
    model = TinyClassifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for make in (
        lambda: attach(model, optimizer, MAX_STEPS, reinit_when="sometimes"),
        lambda: RifleTrainerCallback(reinit_when="sometimes"),
        lambda: RifleConfig(output_dir="out", reinit_when="sometimes"),
    ):
        with pytest.raises(ValueError, match=r"Unknown reinit_when='sometimes': choose one of 'always', 'fitted'"):
            make()


def test_l2sp_attached_after_a_checkpoint_was_loaded_is_refused_naming_both_ways_out():
    trained, optimizer, _ = run("always", signal=8.0, steps=range(12))
    state = saved(trained, optimizer)
    model = TinyClassifier()
    late = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.load_state_dict(state["model"])
    late.load_state_dict(state["optimizer"])
    with pytest.raises(ValueError, match="RIFLE step 12") as refusal:
        attach(model, late, MAX_STEPS, regularizer="l2sp")
    assert "Call attach before loading the checkpoint" in str(refusal.value)
    assert "l2sp_reference=" in str(refusal.value)
    reference = [p.detach().clone() for name, p in TinyClassifier().named_parameters() if not name.startswith("fc")]
    assert attach(model, late, MAX_STEPS, regularizer="l2sp", l2sp_reference=reference).step == 12


def test_a_decision_reads_as_the_numbers_behind_it():
    kept = FitDecision(step=80, period=2, loss_ratio=0.93, head_age=80, max_steps=240, redrawn=False)
    assert kept.describe(3, "fitted") == (
        "kept the head at step 80 of 240: it has not fit yet (its top-class loss on the last 10% of the period's "
        f"training batches was 0.93 of a uniform guess's; fit means at most {FITTED_LOSS_RATIO:.2f})."
    )
    late = FitDecision(step=160, period=3, loss_ratio=0.1, head_age=160, max_steps=240, redrawn=False)
    assert late.describe(3, "fitted").endswith("but took 160 steps, more than the 80 a new head would have left.")
    forced = FitDecision(step=80, period=2, loss_ratio=0.93, head_age=80, max_steps=240, redrawn=True)
    assert forced.describe(3, "always", "fc").startswith("re-initialized the head 'fc' at step 80 of 240 (period 2 of")
    assert forced.describe(3, "always", "fc").endswith("reinit_when='fitted' would have kept it.")
    unmeasured = FitDecision(step=80, period=2, loss_ratio=None, head_age=80, max_steps=240, redrawn=False)
    assert not unmeasured.fit and "no training forward of the head was seen" in unmeasured.describe(3, "fitted")
