"""RifleTrainerCallback on a plain Trainer: the full method, equal to RifleTrainer, visible and guarded."""

import logging

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_rifle import RifleConfig, RifleTrainer, RifleTrainerCallback, cyclic_cosine_factor, find_head
from hf_rifle.optim import check_update_scales_with_lr, record_head_update_, rescale_head_update_

from ..helpers import RandomImages, native_resnet, timm_wrapper_resnet, tiny_run_settings

# Rounding of the rescaled update (w_before + scale * (w - w_before)) in float64, accumulated over 9 steps of a
# tiny random net whose gradient norms reach the hundreds, so that rounding grows ~10x a step.
TOLERANCE = dict(rtol=1e-8, atol=1e-8)


def shared_settings(output_dir, **overrides) -> dict:
    """Training settings both paths get: cosine, no clipping, one seed."""
    return tiny_run_settings(output_dir, **overrides)


def model_and_data(dtype: torch.dtype):
    """In float64 the two paths' rounding differences stay far below the tolerance; in float32, Adam's
    normalization of near-zero gradients lets them grow to the size of the learning rate within a few steps."""
    data = RandomImages()
    data.images = data.images.to(dtype)
    return timm_wrapper_resnet().to(dtype), data


def plain_trainer(output_dir, method: dict, dtype=torch.float32, **overrides):
    model, data = model_and_data(dtype)
    args = TrainingArguments(**shared_settings(output_dir, **overrides))
    callback = RifleTrainerCallback(**method)
    return model, Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])


def rifle_trainer(output_dir, method: dict, dtype=torch.float32, **overrides):
    model, data = model_and_data(dtype)
    args = RifleConfig(**shared_settings(output_dir, **overrides), **method)
    return model, RifleTrainer(model=model, args=args, train_dataset=data)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, **TOLERANCE, msg=name)


CASES = {
    "sgd-momentum": dict(optim="sgd", optim_args="momentum=0.9"),
    "adamw": dict(optim="adamw_torch", optim_args=None, learning_rate=0.001),
    "sgd-momentum-ga2": dict(optim="sgd", optim_args="momentum=0.9", gradient_accumulation_steps=2),
}  # fmt: skip


@pytest.mark.parametrize("regularizer", ["l2", "l2sp"])
@pytest.mark.parametrize("case", list(CASES))
def test_plain_trainer_with_the_callback_ends_with_rifle_trainers_weights(tmp_path, case, regularizer):
    method = dict(num_periods=3, regularizer=regularizer, l2sp_alpha=0.5, l2sp_beta=0.1)
    settings = {**CASES[case], "weight_decay": 0.01 if regularizer == "l2" else 0.0}  # L2 is weight decay
    plain_model, plain = plain_trainer(tmp_path / "plain", method, torch.float64, **settings)
    plain.train()
    rifle_model, rifle = rifle_trainer(tmp_path / "rifle", method, torch.float64, **settings)
    rifle.train()
    assert_same_weights(plain_model, rifle_model)
    moved = [
        not torch.equal(a, b.double()) for a, b in zip(plain_model.parameters(), timm_wrapper_resnet().parameters())
    ]
    assert all(moved)


def test_resumed_mid_period_the_callback_path_still_ends_with_rifle_trainers_weights(tmp_path):
    method = dict(num_periods=3, regularizer="l2sp", l2sp_alpha=0.5, l2sp_beta=0.1)
    _, first = plain_trainer(tmp_path / "plain", method, torch.float64, save_strategy="steps", save_steps=4)
    first.train()
    resumed_model, resumed = plain_trainer(tmp_path / "plain", method, torch.float64)
    resumed.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-4"))
    rifle_model, rifle = rifle_trainer(tmp_path / "rifle", method, torch.float64)
    rifle.train()
    assert_same_weights(resumed_model, rifle_model)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
        lambda groups: torch.optim.Adam(groups, lr=0.01),
        lambda groups: torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1),
        lambda groups: torch.optim.RMSprop(groups, lr=0.01, momentum=0.5),
    ],
    ids=["sgd-nesterov", "adam", "adamw", "rmsprop"],
)
def test_a_rescaled_head_update_equals_a_learning_rate_of_its_own(make_optimizer):
    """Head in its own group at lr * cyclic factor vs head sharing the backbone's group and rescaled."""
    max_steps, num_periods, trainer_curve = 12, 3, [1.0 - t / 12 for t in range(12)]
    torch.manual_seed(0)
    own, shared = torch.nn.Linear(6, 3), None
    shared = torch.nn.Linear(6, 3)
    shared.load_state_dict(own.state_dict())
    own_optimizer = make_optimizer([{"params": own.parameters()}])
    shared_optimizer = make_optimizer([{"params": shared.parameters()}])
    peak = own_optimizer.param_groups[0]["lr"]
    for group in shared_optimizer.param_groups:
        group["initial_lr"] = peak
    inputs = torch.randn(max_steps, 5, 6)
    for step in range(max_steps):
        own_optimizer.param_groups[0]["lr"] = peak * cyclic_cosine_factor(step, max_steps, num_periods)
        shared_optimizer.param_groups[0]["lr"] = peak * trainer_curve[step]
        for model in (own, shared):
            model.zero_grad()
            model(inputs[step]).square().mean().backward()
        own_optimizer.step()
        updates = record_head_update_(shared_optimizer, shared.parameters(), step, max_steps, num_periods, peak)
        shared_optimizer.step()
        rescale_head_update_(updates)
    for a, b in zip(own.parameters(), shared.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda params: torch.optim.Rprop(params, lr=0.01),
        lambda params: torch.optim.ASGD(params, lr=0.01),
    ],
    ids=["rprop", "asgd"],
)
def test_optimizers_whose_state_depends_on_the_learning_rate_are_refused_with_the_alternatives(optimizer):
    with pytest.raises(ValueError, match="Use RifleTrainer.*head_lr_schedule='trainer'"):
        check_update_scales_with_lr(optimizer(torch.nn.Linear(2, 2).parameters()))


def test_adafactor_is_accepted_only_without_its_relative_step():
    from transformers.optimization import Adafactor

    params = list(torch.nn.Linear(2, 2).parameters())
    check_update_scales_with_lr(Adafactor(params, lr=0.01, relative_step=False, scale_parameter=False))
    with pytest.raises(ValueError, match="Adafactor is not known to be one"):
        check_update_scales_with_lr(Adafactor(params, lr=None, relative_step=True))


def test_a_refused_optimizer_stops_the_run_before_the_first_step(tmp_path):
    model = timm_wrapper_resnet()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**shared_settings(tmp_path)),
        train_dataset=RandomImages(),
        optimizers=(torch.optim.Rprop(model.parameters(), lr=0.01), None),
        callbacks=[RifleTrainerCallback()],
    )
    with pytest.raises(ValueError, match="Rprop is not known to be one"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("path", ["callback", "rifle_trainer"])
def test_head_learning_rate_period_and_l2sp_loss_are_logged_in_both_paths(tmp_path, path):
    method = dict(num_periods=3, regularizer="l2sp", reinit_when="always")  # every period's head on the cosine
    build = plain_trainer if path == "callback" else rifle_trainer
    _, trainer = build(tmp_path, method, learning_rate=0.1)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == list(range(1, 10))
    for entry in logged:
        step = entry["step"]
        assert entry["head_learning_rate"] == pytest.approx(0.1 * cyclic_cosine_factor(step, 9, 3), abs=1e-12)
        assert entry["rifle_period"] == min(step // 3, 2) + 1
        assert entry["l2sp_loss"] > 0


def test_logged_values_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, trainer = plain_trainer(tmp_path, dict(regularizer="l2sp"), report_to="tensorboard")
    trainer.train()
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/head_learning_rate", "train/rifle_period", "train/l2sp_loss"} <= tags
    assert [event.value for event in events.Scalars("train/rifle_period")] == [1, 1, 2, 2, 2, 3, 3, 3, 3]


def test_planned_and_done_reinits_and_the_fit_statistic_reach_tensorboard_and_the_card(tmp_path, caplog):
    """Random labels: the head cannot fit in 3 steps, so with reinit_when="fitted" both planned re-inits are kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, trainer = rifle_trainer(tmp_path, dict(reinit_when="fitted"), report_to="tensorboard")
    with caplog.at_level(logging.WARNING, logger="hf_rifle"):
        trainer.train()
    decisions = trainer.reinit_decisions()
    assert [(d.step, d.redrawn, d.head_age) for d in decisions] == [(3, False, 3), (6, False, 6)]
    kept = [r.getMessage() for r in caplog.records if r.getMessage().startswith("RIFLE: kept the head")]
    assert trainer.rifle.settings_warnings == []  # periods of 0.75 epochs: the fit test, not the epochs, decides
    assert len(kept) == 2 and all(r.levelno == logging.WARNING for r in caplog.records if "kept" in r.getMessage())
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    # Each log follows its step's update; the decision at step 3 is taken when step 3 (the 4th) begins.
    assert [e.value for e in events.Scalars("train/rifle_reinits_planned")] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [e.value for e in events.Scalars("train/rifle_reinits_done")] == [0] * 9
    ratios = [e.value for e in events.Scalars("train/rifle_fit_loss_ratio")]
    assert ratios == pytest.approx([decisions[0].loss_ratio] * 3 + [decisions[1].loss_ratio] * 3, rel=1e-6)
    assert trainer.state.log_history[-2]["rifle_reinits_planned"] == 2  # in trainer_state.json too

    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "| re-initialize when | fitted: at a period start only once the head has fit" in card
    assert 'Re-initializations planned: 2, done: 0 (`reinit_when="fitted"`)' in card
    assert "In this run the head was re-drawn at a period start only once it had fit its training batches" in card
    for decision in decisions:
        assert f"| {decision.step} | {decision.loss_ratio:.3f} | no | {decision.head_age} | kept |" in card
    assert "Head re-initialized at optimizer steps: none (of 9)." in card


def test_a_head_redrawn_before_it_fit_is_a_warning_a_script_shows(tmp_path, caplog):
    """Random images and labels: under the paper's schedule the head is re-drawn in 3 steps, before it fit."""
    _, trainer = plain_trainer(tmp_path, dict(num_periods=3, reinit_when="always"))
    with caplog.at_level(logging.WARNING, logger="hf_rifle"):
        trainer.train()
    reinits = [r.getMessage().split("; ")[0] for r in caplog.records if "re-initialized the head" in r.getMessage()]
    assert reinits == [
        "RIFLE: re-initialized the head 'timm_model.fc' at step 3 of 9 (period 2 of 3)",
        "RIFLE: re-initialized the head 'timm_model.fc' at step 6 of 9 (period 3 of 3)",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records if "re-initialized" in r.getMessage())


def test_clipping_short_periods_and_doubled_accumulation_are_warned_about_once(tmp_path, caplog):
    model = native_resnet()
    args = TrainingArguments(**shared_settings(tmp_path, max_grad_norm=1.0, gradient_accumulation_steps=2))
    callback = RifleTrainerCallback(reinit_when="always")  # the paper's schedule: its short periods are warned about
    trainer = Trainer(model=model, args=args, train_dataset=RandomImages(), callbacks=[callback])
    with caplog.at_level(logging.WARNING, logger="hf_rifle"):
        trainer.train()
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("hf_rifle")]
    assert sum("gradient clipping (max_grad_norm=1.0)" in m and "87.8% to 18.7%" in m for m in messages) == 1
    assert sum("may not fit again" in m for m in messages) == 1
    assert sum("gradient_accumulation_steps=2 with ResNetForImageClassification" in m for m in messages) == 1


def test_rifle_trainer_on_the_papers_schedule_warns_about_nothing_but_short_periods(tmp_path, caplog):
    _, trainer = rifle_trainer(tmp_path, dict(num_periods=3, reinit_when="always"), gradient_accumulation_steps=2)
    with caplog.at_level(logging.WARNING, logger="hf_rifle"):
        trainer.train()
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("hf_rifle") and not r.getMessage().startswith("RIFLE: re-initialized")
    ]
    assert len(warnings) == 1 and "may not fit again" in warnings[0]


def test_callback_arguments_are_rifle_configs_method_fields_with_the_same_defaults():
    import inspect

    from hf_rifle.config import METHOD_FIELDS

    parameters = inspect.signature(RifleTrainerCallback).parameters
    config = RifleConfig(output_dir="out")
    assert set(METHOD_FIELDS) <= set(parameters)
    assert {name: parameters[name].default for name in METHOD_FIELDS} == config.method_settings()


def test_only_the_trainable_copy_of_a_peft_head_is_redrawn_and_l2sp_covers_trainable_weights(tmp_path):
    peft = pytest.importorskip("peft")
    base = native_resnet()
    lora = peft.get_peft_model(
        base, peft.LoraConfig(target_modules=["convolution"], modules_to_save=["classifier"], r=2)
    )
    name, head = find_head(lora)
    wrapper = base.classifier
    assert name.endswith("modules_to_save.default") and head is wrapper.modules_to_save["default"]
    original = {k: v.clone() for k, v in wrapper.original_module.state_dict().items()}
    callback = RifleTrainerCallback(num_periods=3, regularizer="l2sp", reinit_when="always")
    args = TrainingArguments(**shared_settings(tmp_path, learning_rate=0.0))
    Trainer(model=lora, args=args, train_dataset=RandomImages(), callbacks=[callback]).train()
    for key, value in wrapper.original_module.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert not torch.equal(head[1].weight, original["1.weight"])  # re-drawn (lr 0: only re-inits move it)
    backbone, _, head_params, _, _ = callback.handle._l2sp  # (backbone, reference, head, alpha, beta)
    trainable = {id(p) for p in lora.parameters() if p.requires_grad}
    assert {id(p) for p in backbone + head_params} == trainable
