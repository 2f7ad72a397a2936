"""`attach` in a plain PyTorch loop: RifleTrainer's weights, re-inits at the first training forward of a period,
resume through the optimizer's state dict, loss scaling, detach, and the refusals."""

import copy
import inspect
import io
import logging

import pytest
import torch
from accelerate import Accelerator
from torch._dynamo.utils import counters
from transformers import default_data_collator, get_cosine_schedule_with_warmup

from hf_rifle import (
    RifleConfig,
    RifleTrainer,
    RifleTrainerCallback,
    cyclic_cosine_factor,
    head_seed,
    reinit_head_,
    reinit_steps,
)
from hf_rifle.attach import STATE_KEY, attach
from hf_rifle.config import METHOD_FIELDS
from hf_rifle.optim import attach_cyclic_head_schedule_, head_group_indices, isolate_head_param_groups_
from hf_rifle.schedule import RunShape

from ..helpers import (
    RandomImages,
    run_docstring_example,
    timm_wrapper_resnet,
    tiny_run_settings,
    tiny_text_classifier,
    token_dataset,
)

SEED, MAX_STEPS, LR, BATCH = 3, 9, 0.01, 4  # as tiny_run_settings: periods start at steps 0, 3, 6
METHOD = dict(num_periods=3, l2sp_alpha=0.5, l2sp_beta=0.1, reinit_when="always")  # the paper's schedule
TOLERANCE = dict(rtol=1e-8, atol=1e-8)  # float64, as the callback's comparison with RifleTrainer


def float64_model_and_data():
    data = RandomImages()
    data.images = data.images.double()
    return timm_wrapper_resnet().double(), data


def batch(data, index: int) -> dict:
    """Batch `index` as Trainer reads them with train_sampling_strategy="sequential" (every epoch in order)."""
    start = index * BATCH % len(data)
    return {"pixel_values": data.images[start : start + BATCH], "labels": data.labels[start : start + BATCH]}


def sgd_and_cosine(model, weight_decay=0.0, decay_names=None):
    """SGD momentum 0.9 and the cosine schedule RifleTrainer builds, with Trainer's weight-decay groups."""
    named = list(model.named_parameters())
    decay = set(decay_names if decay_names is not None else (name for name, _ in named))
    groups = [
        {"params": [p for name, p in named if name in decay], "weight_decay": weight_decay},
        {"params": [p for name, p in named if name not in decay], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.SGD(groups, lr=LR, momentum=0.9)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, 0, MAX_STEPS)


def train(model, optimizer, scheduler, data, steps, accumulation=1, scaler=None, between_steps=None):
    """A plain loop: forward/backward per micro-batch, one optimizer and scheduler step per step."""
    for step in steps:
        if between_steps is not None:
            between_steps(step)
        model.train()
        for micro in range(accumulation):
            loss = model(**batch(data, step * accumulation + micro)).loss / accumulation
            (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        scheduler.step()
        optimizer.zero_grad()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, **TOLERANCE, msg=name)


def reinit_messages(caplog) -> list[str]:
    """The re-init lines up to the fit test's numbers, which follow after '; '."""
    return [r.getMessage().split("; ")[0] for r in caplog.records if r.getMessage().startswith("RIFLE: re-initialized")]


def reinit_message(step: int) -> str:
    period = reinit_steps(MAX_STEPS, 3).index(step) + 2
    return f"RIFLE: re-initialized the head 'timm_model.fc' at step {step} of {MAX_STEPS} (period {period} of 3)"


def test_attach_takes_rifle_configs_method_fields_with_the_same_defaults():
    parameters = inspect.signature(attach).parameters
    assert {name: parameters[name].default for name in METHOD_FIELDS} == RifleConfig(output_dir="out").method_settings()


def test_the_docstring_example_runs():
    data = token_dataset(size=24)
    batches = [default_data_collator(data[i : i + 4]) for i in range(0, 24, 4)]
    result = run_docstring_example(attach, {"model": tiny_text_classifier(), "batches": batches})
    assert result.failed == 0


@pytest.mark.parametrize("regularizer", ["l2", "l2sp"])
def test_a_plain_loop_with_attach_ends_with_rifle_trainers_weights(tmp_path, regularizer):
    weight_decay = 0.01 if regularizer == "l2" else 0.0  # L2 is the optimizer's weight decay
    settings = tiny_run_settings(tmp_path, weight_decay=weight_decay, train_sampling_strategy="sequential")
    rifle_model, data = float64_model_and_data()
    rifle = RifleTrainer(
        model=rifle_model, args=RifleConfig(**settings, regularizer=regularizer, **METHOD), train_dataset=data
    )
    rifle.train()

    model, _ = float64_model_and_data()
    optimizer, scheduler = sgd_and_cosine(model, weight_decay, rifle.get_decay_parameter_names(model))
    attach(model, optimizer, MAX_STEPS, regularizer=regularizer, seed=SEED, **METHOD)
    train(model, optimizer, scheduler, data, range(MAX_STEPS))
    assert_same_weights(model, rifle_model)


def test_the_head_is_redrawn_at_the_first_training_forward_of_a_period_and_evaluation_sees_the_trained_one(caplog):
    model, data = float64_model_and_data()
    optimizer, scheduler = sgd_and_cosine(model)
    rifle = attach(model, optimizer, MAX_STEPS, num_periods=3, seed=SEED, reinit_when="always")
    head = model.timm_model.fc
    seen = {}  # ("train" | "eval", step) -> the head's weight at that forward
    head.register_forward_pre_hook(
        lambda module, args: seen.setdefault(("train" if module.training else "eval", rifle.step), module.weight + 0)
    )
    trained, logged = [], []

    def evaluate(step):
        trained.append(head.weight.detach().clone())  # after the previous update
        logged.append((rifle.step, rifle.period, rifle.head_learning_rate))
        model.eval()
        with torch.no_grad():
            model(**batch(data, 0))

    with caplog.at_level(logging.INFO, logger="hf_rifle"):
        train(model, optimizer, scheduler, data, range(MAX_STEPS), between_steps=evaluate)

    assert all(torch.equal(seen["eval", step], trained[step]) for step in range(MAX_STEPS))
    redrawn = [step for step in range(MAX_STEPS) if not torch.equal(seen["train", step], trained[step])]
    assert redrawn == reinit_steps(MAX_STEPS, 3) == [3, 6]
    for step, period in ((3, 1), (6, 2)):
        expected = copy.deepcopy(head)
        reinit_head_(expected, head_seed(SEED, period))
        assert torch.equal(seen["train", step], expected.weight)
    assert reinit_messages(caplog) == [reinit_message(3), reinit_message(6)]
    for step, (rifle_step, period, head_lr) in enumerate(logged):
        assert (rifle_step, period) == (step, min(step // 3, 2) + 1)
        assert head_lr == pytest.approx(LR * cyclic_cosine_factor(step, MAX_STEPS, 3), abs=1e-15)


def test_gradient_accumulation_redraws_the_head_once_per_period(caplog):
    model, data = float64_model_and_data()
    optimizer, scheduler = sgd_and_cosine(model)
    attach(model, optimizer, MAX_STEPS, num_periods=3, seed=SEED, reinit_when="always")
    weights = []  # the head at every training forward
    model.timm_model.fc.register_forward_pre_hook(lambda module, args: weights.append(module.weight + 0))
    with caplog.at_level(logging.INFO, logger="hf_rifle"):
        train(model, optimizer, scheduler, data, range(MAX_STEPS), accumulation=2)
    assert len(weights) == 2 * MAX_STEPS
    assert all(torch.equal(weights[2 * step], weights[2 * step + 1]) for step in range(MAX_STEPS))
    assert reinit_messages(caplog) == [reinit_message(3), reinit_message(6)]

    # accelerate's loop calls optimizer.step() at every micro-batch; the base optimizer, and RIFLE, step once per 2.
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    accelerate_model, _ = float64_model_and_data()
    accelerate_optimizer, accelerate_scheduler = sgd_and_cosine(accelerate_model)
    accelerate_model, accelerate_optimizer = accelerator.prepare(accelerate_model, accelerate_optimizer)
    rifle = attach(accelerate_model, accelerate_optimizer, MAX_STEPS, num_periods=3, seed=SEED, reinit_when="always")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_rifle"):
        for index in range(2 * MAX_STEPS):
            with accelerator.accumulate(accelerate_model):
                accelerator.backward(accelerate_model(**batch(data, index)).loss)
                accelerate_optimizer.step()
                accelerate_optimizer.zero_grad()
            if accelerator.sync_gradients:
                accelerate_scheduler.step()
    assert rifle.step == MAX_STEPS
    assert reinit_messages(caplog) == [reinit_message(3), reinit_message(6)]
    assert_same_weights(accelerate_model, model)


@pytest.mark.slow  # 11 s: compiling
def test_under_torch_compile_the_forward_hook_redraws_the_head_without_recompiling(caplog):
    torch._dynamo.reset()
    counters.clear()
    model, data = float64_model_and_data()
    model.config.problem_type = "single_label_classification"  # set at the first loss otherwise: one recompile
    optimizer, scheduler = sgd_and_cosine(model)
    attach(model, optimizer, MAX_STEPS, num_periods=3, seed=SEED, reinit_when="always")
    model.compile(backend="eager")  # the hook runs inside the compiled call; the eager backend keeps dynamo's guards
    graphs = []
    with caplog.at_level(logging.INFO, logger="hf_rifle"):
        for step in range(MAX_STEPS):
            train(model, optimizer, scheduler, data, [step])
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs == [graphs[0]] * MAX_STEPS
    assert reinit_messages(caplog) == [reinit_message(3), reinit_message(6)]


def l2sp_run():
    model, data = float64_model_and_data()
    optimizer, scheduler = sgd_and_cosine(model)
    rifle = attach(model, optimizer, MAX_STEPS, regularizer="l2sp", seed=SEED, **METHOD)
    return model, data, optimizer, scheduler, rifle


def save(model, optimizer, scheduler) -> io.BytesIO:
    """What a loop saves: the model's, the optimizer's and the scheduler's state dicts."""
    buffer = io.BytesIO()
    torch.save([model.state_dict(), optimizer.state_dict(), scheduler.state_dict()], buffer)
    buffer.seek(0)
    return buffer


def load(checkpoint: io.BytesIO, model, optimizer, scheduler) -> None:
    model_state, optimizer_state, scheduler_state = torch.load(checkpoint)
    model.load_state_dict(model_state)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)


@pytest.mark.parametrize("checkpoint", [4, 3], ids=["mid-period", "at-a-period-start"])
def test_resumed_through_the_optimizers_state_dict_a_run_ends_with_the_uninterrupted_runs_weights(caplog, checkpoint):
    full_model, data, full_optimizer, full_scheduler, _ = l2sp_run()
    train(full_model, full_optimizer, full_scheduler, data, range(MAX_STEPS))
    first_model, _, first_optimizer, first_scheduler, _ = l2sp_run()
    train(first_model, first_optimizer, first_scheduler, data, range(checkpoint))
    saved = save(first_model, first_optimizer, first_scheduler)

    model, _, optimizer, scheduler, rifle = l2sp_run()  # attach first: L2-SP's reference is the pretrained backbone
    load(saved, model, optimizer, scheduler)
    assert (rifle.step, rifle.period) == (checkpoint, 2)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_rifle"):
        train(model, optimizer, scheduler, data, range(checkpoint, MAX_STEPS))
    assert reinit_messages(caplog) == [reinit_message(step) for step in (3, 6) if step >= checkpoint]
    assert_same_weights(model, full_model)


def test_the_handles_state_dict_resumes_and_the_step_travels_in_the_optimizers_param_groups():
    model = timm_wrapper_resnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    rifle = attach(model, optimizer, MAX_STEPS)
    rifle.load_state_dict({"step": 4, "max_steps": MAX_STEPS, "num_periods": 3})
    assert (rifle.step, rifle.period) == (4, 2)
    assert all(group[STATE_KEY]["step"] == 4 for group in optimizer.state_dict()["param_groups"])
    other_model = timm_wrapper_resnet()
    other = torch.optim.SGD(other_model.parameters(), lr=LR)
    other.load_state_dict(optimizer.state_dict())  # before attach: attach takes the step from it
    assert attach(other_model, other, MAX_STEPS).step == 4


def test_a_resume_with_another_max_steps_or_num_periods_is_refused_naming_both_and_the_fix():
    model = timm_wrapper_resnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    rifle = attach(model, optimizer, MAX_STEPS)
    other_model = timm_wrapper_resnet()
    other = torch.optim.SGD(other_model.parameters(), lr=LR)
    attach(other_model, other, 12)
    with pytest.raises(
        ValueError,
        match=r"max_steps=9, num_periods=3 \(head re-drawn at steps 3, 6\); this one was attached with "
        r"max_steps=12, num_periods=3\. .*Call attach\(\.\.\., max_steps=9, num_periods=3\)",
    ):
        other.load_state_dict(optimizer.state_dict())
    third_model = timm_wrapper_resnet()
    third = attach(third_model, torch.optim.SGD(third_model.parameters(), lr=LR), MAX_STEPS, num_periods=4)
    with pytest.raises(ValueError, match=r"num_periods=3 .* num_periods=4\."):
        third.load_state_dict(rifle.state_dict())


def test_where_both_runs_recorded_their_shape_the_refusal_names_what_changed_and_the_setting_that_keeps_it():
    two_processes, one_process = RunShape(MAX_STEPS, 2, BATCH, 1), RunShape(2 * MAX_STEPS, 1, BATCH, 1)
    model = timm_wrapper_resnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    attach(model, optimizer, MAX_STEPS, run_shape=two_processes)
    assert all(group[STATE_KEY]["run_shape"]["processes"] == 2 for group in optimizer.param_groups)
    other_model = timm_wrapper_resnet()
    other = torch.optim.SGD(other_model.parameters(), lr=LR)
    other.load_state_dict(optimizer.state_dict())
    with pytest.raises(
        ValueError,
        match=r"comes from a run of 9 optimizer steps \(2 processes x batch 4 x accumulation 1 = 8 samples per step\); "
        r"this run would take 18 \(1 process .*\(with 1 process: gradient_accumulation_steps=2\)",
    ):
        attach(other_model, other, 2 * MAX_STEPS, run_shape=one_process)
    assert not other._optimizer_step_pre_hooks  # refused before any hook


@pytest.mark.parametrize("fused", [False, True], ids=["for-loop", "fused"])
def test_loss_scaling_gives_the_weights_of_the_unscaled_run(fused):
    """A fused optimizer's gradients are still scaled in the pre-hook: L2-SP's must be scaled with them."""

    def run(scaler):
        model, data = float64_model_and_data()
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, fused=fused)
        scheduler = get_cosine_schedule_with_warmup(optimizer, 0, MAX_STEPS)
        # Head momentum kept: fused SGD cannot step a group in which only some momentum buffers were cleared.
        attach(model, optimizer, MAX_STEPS, reset_head_optimizer_state=False, regularizer="l2sp", seed=SEED, **METHOD)
        train(model, optimizer, scheduler, data, range(MAX_STEPS), scaler=scaler)
        return model

    assert_same_weights(run(torch.amp.GradScaler("cpu", init_scale=2.0**10)), run(None))


def test_after_detach_the_loop_trains_as_without_rifle(caplog):
    """Two steps with RIFLE, then steps 2..8 (period starts 3 and 6 included): detached, as a plain optimizer."""
    model, data, optimizer, scheduler, rifle = l2sp_run()
    with rifle:
        train(model, optimizer, scheduler, data, range(2))
    plain_model, _ = float64_model_and_data()
    plain_optimizer, plain_scheduler = sgd_and_cosine(plain_model)
    load(save(model, optimizer, scheduler), plain_model, plain_optimizer, plain_scheduler)
    with caplog.at_level(logging.INFO, logger="hf_rifle"):
        train(model, optimizer, scheduler, data, range(2, MAX_STEPS))
    train(plain_model, plain_optimizer, plain_scheduler, data, range(2, MAX_STEPS))
    assert reinit_messages(caplog) == []
    for (name, a), b in zip(model.state_dict().items(), plain_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_an_optimizer_whose_update_does_not_scale_with_the_learning_rate_is_refused_unless_the_head_has_groups():
    model = timm_wrapper_resnet()
    with pytest.raises(ValueError, match="Rprop is not known to be one"):
        attach(model, torch.optim.Rprop(model.parameters(), lr=LR), MAX_STEPS)
    optimizer = torch.optim.Rprop(model.parameters(), lr=LR)
    isolate_head_param_groups_(optimizer, model.timm_model.fc.parameters())
    attach_cyclic_head_schedule_(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), MAX_STEPS, 3)
    rifle = attach(model, optimizer, MAX_STEPS)  # the head's groups get their curve from the scheduler
    assert rifle.head_learning_rate == optimizer.param_groups[head_group_indices(optimizer)[0]]["lr"] == LR


def test_an_optimizer_without_the_head_is_refused():
    model = timm_wrapper_resnet()
    backbone = [p for name, p in model.named_parameters() if not name.startswith("timm_model.fc.")]
    with pytest.raises(ValueError, match="None of the head's parameters are in the optimizer"):
        attach(model, torch.optim.SGD(backbone, lr=LR), MAX_STEPS)


def test_weight_decay_with_l2sp_and_short_periods_are_warned_about_once(caplog):
    model = timm_wrapper_resnet()
    with caplog.at_level(logging.WARNING, logger="hf_rifle"):
        rifle = attach(
            model,
            torch.optim.AdamW(model.parameters()),
            MAX_STEPS,
            regularizer="l2sp",
            num_train_epochs=12,
            reinit_when="always",
        )
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("hf_rifle")]
    assert messages == rifle.settings_warnings and len(messages) == 2
    assert "weight_decay is 0.01" in messages[0] and "periods of 4.0 epochs (12 epochs / K=3)" in messages[1]
    quiet = attach(
        model,
        torch.optim.SGD(model.parameters(), lr=LR),
        MAX_STEPS,
        regularizer="l2sp",
        num_train_epochs=24,
        reinit_when="always",
    )
    assert quiet.settings_warnings == []


def test_attach_draws_the_heads_with_the_seed_the_trainer_paths_default_to():
    """One default seed on every path: the callback's None means TrainingArguments.seed."""
    from transformers import TrainingArguments

    assert inspect.signature(attach).parameters["seed"].default == TrainingArguments("out").seed == 42
    assert inspect.signature(RifleTrainerCallback).parameters["seed"].default is None
