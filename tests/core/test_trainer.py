"""End-to-end Trainer runs on tiny models, checked against the paper's formulas."""

import copy
import math

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_rifle import (
    RifleConfig,
    RifleTrainer,
    RifleTrainerCallback,
    cyclic_cosine_factor,
    find_head,
    head_seed,
    reinit_head_,
)
from hf_rifle.optim import head_group_indices

from ..helpers import RandomImages, native_resnet, timm_wrapper_resnet, tiny_run_settings

FAST = dict(report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", dataloader_num_workers=0)


class Recorder(TrainerCallback):
    """Per optimizer step: learning rates of head and backbone groups, and the weights the step started from."""

    def __init__(self, model):
        self.model = model
        _, self.head = find_head(model)
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        heads = set(head_group_indices(optimizer))
        lrs = [group["lr"] for group in optimizer.param_groups]
        self.steps.append(
            {
                "step": state.global_step,
                "head_lr": [lr for i, lr in enumerate(lrs) if i in heads],
                "backbone_lr": [lr for i, lr in enumerate(lrs) if i not in heads],
                "head": next(self.head.parameters()).detach().clone(),
                "backbone": next(self.model.parameters()).detach().clone(),
            }
        )


def rifle_config(tmp_path, **overrides):
    """Plain SGD (no momentum) at lr 0.1, K=3 over 9 steps, on the paper's schedule (every planned re-init done)."""
    settings = {"learning_rate": 0.1, "optim_args": None, "reinit_when": "always", **overrides}
    return RifleConfig(**tiny_run_settings(tmp_path, **settings))


def test_zero_learning_rate_changes_the_head_only_by_reinit_at_period_starts(tmp_path):
    model = timm_wrapper_resnet()
    initial = model.timm_model.fc.weight.detach().clone()
    recorder = Recorder(model)
    RifleTrainer(
        model=model, args=rifle_config(tmp_path, learning_rate=0.0), train_dataset=RandomImages(), callbacks=[recorder]
    ).train()

    heads = [record["head"] for record in recorder.steps]
    assert [record["step"] for record in recorder.steps] == list(range(9))
    changed_at = [t for t in range(1, 9) if not torch.equal(heads[t], heads[t - 1])]
    assert changed_at == [3, 6]
    assert torch.equal(heads[0], initial)
    for step, period in ((3, 1), (6, 2)):
        expected = copy.deepcopy(model.timm_model.fc)
        reinit_head_(expected, head_seed(3, period))
        assert torch.equal(heads[step], expected.weight)
    assert all(torch.equal(record["backbone"], recorder.steps[0]["backbone"]) for record in recorder.steps)


def test_callback_on_a_plain_trainer_redraws_the_head_only_at_period_starts(tmp_path):
    model = native_resnet()
    recorder = Recorder(model)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8, learning_rate=0.0, seed=1, **FAST
    )
    Trainer(
        model=model,
        args=args,
        train_dataset=RandomImages(),
        callbacks=[recorder, RifleTrainerCallback(num_periods=4, reinit_when="always")],
    ).train()
    heads = [record["head"] for record in recorder.steps]
    assert [t for t in range(1, 8) if not torch.equal(heads[t], heads[t - 1])] == [2, 4, 6]


def test_head_lr_is_cyclic_cosine_and_backbone_keeps_the_trainer_cosine(tmp_path):
    model = timm_wrapper_resnet()
    recorder = Recorder(model)
    max_steps, num_periods, lr = 10, 3, 0.1
    RifleTrainer(
        model=model,
        args=rifle_config(tmp_path, max_steps=max_steps, num_periods=num_periods),
        train_dataset=RandomImages(),
        callbacks=[recorder],
    ).train()

    assert len(recorder.steps) == max_steps
    for record in recorder.steps:
        t = record["step"]
        assert record["head_lr"] and record["backbone_lr"]
        for head_lr in record["head_lr"]:
            assert head_lr == pytest.approx(lr * cyclic_cosine_factor(t, max_steps, num_periods), abs=1e-12)
        for backbone_lr in record["backbone_lr"]:
            assert backbone_lr == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * t / max_steps)), abs=1e-12)


def test_trainer_schedule_option_leaves_the_head_on_the_backbone_curve(tmp_path):
    model = timm_wrapper_resnet()
    recorder = Recorder(model)
    RifleTrainer(
        model=model,
        args=rifle_config(tmp_path, head_lr_schedule="trainer"),
        train_dataset=RandomImages(),
        callbacks=[recorder],
    ).train()
    for record in recorder.steps:
        assert set(record["head_lr"]) == set(record["backbone_lr"])


def test_l2sp_gradient_is_added_to_each_update(tmp_path):
    """One plain SGD step: L2-SP's update differs from L2's by exactly -lr * gradient of the penalty; at the
    pretrained weights that is -lr * beta * w_head on the head and nothing on the backbone."""

    def one_step(regularizer):
        model = timm_wrapper_resnet()
        args = rifle_config(
            tmp_path,
            max_steps=1,
            num_periods=1,
            regularizer=regularizer,
            weight_decay=0.0,  # L2 without its weight decay: the two runs differ by the L2-SP gradient alone
            l2sp_alpha=0.7,
            l2sp_beta=0.5,
            lr_scheduler_type="constant",
            train_sampling_strategy="sequential",
        )
        RifleTrainer(model=model, args=args, train_dataset=RandomImages()).train()
        return model

    start, l2, l2sp = timm_wrapper_resnet(), one_step("l2"), one_step("l2sp")
    for name, initial in start.named_parameters():
        difference = l2sp.get_parameter(name) - l2.get_parameter(name)
        expected = -0.1 * 0.5 * initial if name.startswith("timm_model.fc.") else torch.zeros_like(initial)
        torch.testing.assert_close(difference, expected, rtol=1e-4, atol=1e-6, msg=name)  # float32 rounding


def test_l2sp_term_is_logged_with_the_formulas_value(tmp_path):
    model = timm_wrapper_resnet()
    pretrained = [p.detach().clone() for p in timm_wrapper_resnet().parameters()]
    trainer = RifleTrainer(
        model=model,
        args=rifle_config(tmp_path, regularizer="l2sp", l2sp_alpha=0.3, l2sp_beta=0.5),
        train_dataset=RandomImages(),
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "l2sp_loss" in entry]
    assert [entry["step"] for entry in logged] == list(range(1, 10))
    drift = sum(((w - w0) ** 2).sum() for (n, w), w0 in zip(model.named_parameters(), pretrained) if "fc." not in n)
    head = sum((w**2).sum() for n, w in model.named_parameters() if "fc." in n)
    assert logged[-1]["l2sp_loss"] == pytest.approx((0.3 / 2 * drift + 0.5 / 2 * head).item(), rel=1e-5)


def duplicated_batch_dataset():
    """8 samples whose second half repeats the first, read in order: one batch of 8 and two batches of 4
    then see identical batch-norm statistics, so any gradient difference is the loss scaling."""
    data = RandomImages(size=4, seed=1)
    data.images, data.labels = data.images.repeat(2, 1, 1, 1), data.labels.repeat(2)
    return data


@pytest.mark.parametrize("regularizer", ["l2", "l2sp"])
def test_gradient_accumulation_does_not_change_the_update(tmp_path, regularizer):
    def one_step(batch_size, accumulation):
        model = native_resnet()
        args = rifle_config(
            tmp_path,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            num_periods=1,
            regularizer=regularizer,
            l2sp_alpha=1.0,
            l2sp_beta=1.0,
            train_sampling_strategy="sequential",
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
        )
        RifleTrainer(model=model, args=args, train_dataset=duplicated_batch_dataset()).train()
        return [p.detach() for p in model.parameters()]

    start = [p.detach() for p in native_resnet().parameters()]
    whole, accumulated = one_step(8, 1), one_step(4, 2)
    assert any(not torch.equal(a, b) for a, b in zip(whole, start))
    for a, b in zip(whole, accumulated):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("checkpoint", [4, 3], ids=["mid-period", "at-a-period-start"])
def test_resume_ends_with_the_weights_of_the_uninterrupted_run(tmp_path, checkpoint):
    """Bit for bit on CPU: head groups, cyclic schedule, optimizer state, re-inits and the L2-SP reference
    (the pretrained backbone, not the checkpoint's) all come back. Periods start at steps 0, 3, 6."""

    def run(output_dir, **overrides):
        model = timm_wrapper_resnet()
        args = rifle_config(
            output_dir, regularizer="l2sp", l2sp_alpha=0.5, optim="sgd", optim_args="momentum=0.9", **overrides
        )
        return model, RifleTrainer(model=model, args=args, train_dataset=RandomImages())

    full_model, full = run(tmp_path / "full")
    full.train()
    _, first = run(tmp_path / "split", save_strategy="steps", save_steps=checkpoint)
    first.train()
    resumed_model, resumed = run(tmp_path / "split")
    resumed.train(resume_from_checkpoint=str(tmp_path / "split" / f"checkpoint-{checkpoint}"))

    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.state.global_step == 9


def shift_labels_collator(features):
    """A training-only collator: every label moved to the next class."""
    from transformers import default_data_collator

    batch = default_data_collator(features)
    batch["labels"] = (batch["labels"] + 1) % 4
    return batch


def test_train_data_collator_changes_training_batches_only(tmp_path):
    from transformers import default_data_collator

    data = RandomImages(size=64)
    trainer = RifleTrainer(
        model=timm_wrapper_resnet(),
        args=rifle_config(tmp_path, per_device_eval_batch_size=64, per_device_train_batch_size=64),
        train_dataset=data,
        eval_dataset=data,
        data_collator=default_data_collator,
        train_data_collator=shift_labels_collator,
    )
    evaluated = next(iter(trainer.get_eval_dataloader()))["labels"]
    assert torch.equal(evaluated, data.labels)
    trained = next(iter(trainer.get_train_dataloader()))["labels"]  # shuffled: compare label counts
    assert sorted(trained.tolist()) == sorted(((data.labels + 1) % 4).tolist())


def test_a_hub_that_cannot_be_reached_is_one_line_at_repo_creation_and_upload(tmp_path):
    """The tests run with HF_HUB_OFFLINE=1, which huggingface_hub treats as a Hub it cannot reach."""
    output_dir = tmp_path / "run"
    with pytest.raises(ConnectionError) as creation:
        RifleTrainer(
            model=native_resnet(),
            args=rifle_config(output_dir, push_to_hub=True, hub_model_id="someone/rifle-run"),
            train_dataset=RandomImages(),
        )
    assert str(creation.value).startswith("The Hub at https://huggingface.co could not be reached to create ")
    assert "someone/rifle-run (OfflineModeIsEnabled" in str(creation.value)
    assert "drop --push_to_hub (push_to_hub=False)" in str(creation.value)
    assert creation.value.__suppress_context__  # no traceback into huggingface_hub's HTTP client

    trainer = RifleTrainer(model=native_resnet(), args=rifle_config(output_dir), train_dataset=RandomImages())
    trainer.hub_model_id = "someone/rifle-run"  # as after a repository creation that succeeded
    with pytest.raises(ConnectionError, match="could not be reached to upload to someone/rifle-run") as upload:
        trainer.push_to_hub()
    assert f"saved in {output_dir.resolve()}: upload them later with `hf upload someone/rifle-run" in str(upload.value)
