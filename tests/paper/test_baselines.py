"""The Table 1 baselines, checked on tiny real models: what each changes, in which mode, and what it keeps."""

import copy
import json
import math
import pickle

import pytest
import timm
import torch
from torch import nn
from transformers import HfArgumentParser, TrainerCallback

from hf_rifle import RifleConfig, RifleTrainer, find_head
from hf_rifle.paper.baselines import (
    METHOD_GRIDS,
    METHODS,
    BaselineArguments,
    DisturbLabelCollator,
    add_cnn_dropout_,
    add_fc_dropconnect_,
    add_fc_dropout_,
    apply_baselines_,
    cyclic_lr_settings,
    enable_stochastic_depth_,
    method_flags,
    stochastic_depth_rates,
    wrap_collator,
)
from hf_rifle.paper.stages import residual_stages

from ..helpers import (
    RandomImages,
    native_resnet,
    recipe_flags,
    save_timm_hub_folder,
    timm_wrapper_resnet,
    write_image_folders,
)

FAST = dict(report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", dataloader_num_workers=0)
MODELS = pytest.mark.parametrize("build", [timm_wrapper_resnet, native_resnet], ids=["timm-wrapper", "native"])


class Recorder:
    """Forward (pre-)hook that keeps a copy of what a module received or returned."""

    def __init__(self):
        self.value = None

    def pre(self, module, args):
        self.value = args[0].detach().clone()

    def post(self, module, args, output):
        self.value = output.detach().clone()


def head_input(head: nn.Module, batch: int) -> torch.Tensor:
    """A constant input of the right shape for the head (native ResNet's head starts with Flatten)."""
    linear = head if isinstance(head, nn.Linear) else next(m for m in head.modules() if isinstance(m, nn.Linear))
    shape = (batch, linear.in_features) if isinstance(head, nn.Linear) else (batch, linear.in_features, 1, 1)
    return torch.ones(shape)


def run_head(head, x, train: bool):
    """The head's output and the input it actually saw after the baseline hooks."""
    seen = Recorder()
    handle = head.register_forward_pre_hook(seen.pre)  # registered last: runs after the baselines' hooks
    head.train(train)
    with torch.no_grad():
        out = head(x)
    handle.remove()
    return out, seen.value


# --- FC dropout and DropConnect --------------------------------------------------------------------------


@MODELS
def test_fc_dropout_is_elementwise_unbiased_and_only_in_training(build):
    model = build()
    _, head = find_head(model)
    x = head_input(head, 4000)
    reference, _ = run_head(head, x, train=False)
    add_fc_dropout_(model, 0.2)

    out, seen = run_head(head, x, train=True)
    rows = seen.flatten(1)
    assert set(rows.unique().tolist()) == {0.0, 1 / 0.8}
    assert (rows == 0).float().mean().item() == pytest.approx(0.2, abs=0.01)
    assert ((rows == 0).any(1) & (rows != 0).any(1)).float().mean() > 0.9  # features drop independently
    assert rows.mean().item() == pytest.approx(1.0, abs=0.01)  # scaled by 1/keep: same expectation
    assert torch.allclose(out.mean(0), reference.mean(0), atol=0.05)

    out, seen = run_head(head, x, train=False)
    assert torch.equal(seen, x) and torch.equal(out, reference)


@MODELS
def test_fc_dropconnect_keeps_or_drops_each_sample_whole_and_is_unbiased(build):
    model = build()
    _, head = find_head(model)
    x = head_input(head, 4000)
    reference, _ = run_head(head, x, train=False)
    add_fc_dropconnect_(model, 0.2)

    out, seen = run_head(head, x, train=True)
    rows = seen.flatten(1)
    dropped = (rows == 0).all(1)
    kept = (rows == 1 / 0.8).all(1)
    assert torch.all(dropped | kept)  # one mask value per sample
    assert dropped.float().mean().item() == pytest.approx(0.2, abs=0.03)
    assert rows.mean().item() == pytest.approx(1.0, abs=0.05)
    assert torch.allclose(out.mean(0), reference.mean(0), atol=0.1)
    bias = head.bias if isinstance(head, nn.Linear) else head[-1].bias
    assert torch.allclose(out[dropped], bias.expand_as(out[dropped]))  # a dropped sample's logits: bias only

    out, seen = run_head(head, x, train=False)
    assert torch.equal(seen, x) and torch.equal(out, reference)


@MODELS
def test_baselines_keep_the_head_its_parameters_names_and_state_dict(build):
    model = build()
    name, head = find_head(model)
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    apply_baselines_(
        model, BaselineArguments(fc_dropout=0.1, fc_dropconnect=0.1, cnn_dropout=0.1, stochastic_depth=0.5)
    )

    assert find_head(model) == (name, head)
    assert {n: p for n, p in model.named_parameters()} == params  # same Parameter objects under the same names
    assert list(model.state_dict()) == keys
    add_fc_dropout_(model, 0.3)  # re-applying replaces the hook instead of stacking another
    assert [type(h).__name__ for h in head._forward_pre_hooks.values()] == ["_PerSampleInputDrop", "_InputDropout"]
    add_fc_dropout_(model, 0.0)
    add_fc_dropconnect_(model, 0.0)
    assert not head._forward_pre_hooks


@MODELS
def test_eval_mode_is_the_unchanged_network_and_training_mode_is_not(build):
    model = build()
    plain = copy.deepcopy(model)
    apply_baselines_(
        model, BaselineArguments(fc_dropout=0.5, fc_dropconnect=0.2, cnn_dropout=0.2, stochastic_depth=0.5)
    )
    images = RandomImages(8).images
    with torch.no_grad():
        assert torch.equal(model.eval()(images).logits, plain.eval()(images).logits)
        assert not torch.allclose(model.train()(images).logits, plain.train()(images).logits)
    restored = pickle.loads(pickle.dumps(model))  # hooks are picklable classes, not closures
    with torch.no_grad():
        assert torch.equal(restored.eval()(images).logits, model.eval()(images).logits)


# --- CNN dropout -----------------------------------------------------------------------------------------


@MODELS
def test_cnn_dropout_zeroes_whole_channels_of_stage_outputs_in_training_only(build):
    model = build()
    stages = residual_stages(model)
    raw, after = [Recorder() for _ in stages], [Recorder() for _ in stages]
    for (_, stage), recorder in zip(stages, raw):
        stage.register_forward_hook(recorder.post)
    assert add_cnn_dropout_(model, 0.3) == [name for name, _ in stages]
    for (_, stage), recorder in zip(stages, after):
        stage.register_forward_hook(recorder.post)

    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.train()(images)
    for before, dropped in zip(raw, after):
        channels_before, channels = before.value.flatten(2), dropped.value.flatten(2)
        zero = (channels == 0).all(2)
        assert torch.allclose(channels[~zero], channels_before[~zero] / 0.7, atol=1e-6)
        live = (channels_before != 0).any(2)  # channels the dropout could visibly zero
        assert (zero & live).sum() / live.sum() == pytest.approx(0.3, abs=0.1)
    with torch.no_grad():
        model.eval()(images)
    assert all(torch.equal(b.value, a.value) for b, a in zip(raw, after))


def test_stages_are_found_for_each_supported_layout_and_others_get_a_clear_error():
    assert [n for n, _ in residual_stages(timm_wrapper_resnet())] == [f"timm_model.layer{k}" for k in range(1, 5)]
    assert [n for n, _ in residual_stages(native_resnet())] == ["resnet.encoder.stages.0", "resnet.encoder.stages.1"]
    with pytest.raises(ValueError, match=r"stages=\[\.\.\.\]"):
        add_cnn_dropout_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2)), 0.1)


# --- Stochastic depth ------------------------------------------------------------------------------------


def test_stochastic_depth_rates_decay_linearly_from_0_to_p_last_as_timm_builds_them():
    model = timm.create_model("resnet18", pretrained=False)
    rates = enable_stochastic_depth_(model, 0.5)
    blocks = [f"layer{k}.{i}" for k in range(1, 5) for i in range(2)]
    assert list(rates) == blocks
    assert list(rates.values()) == pytest.approx([0.5 * i / 7 for i in range(8)])
    assert rates["layer1.0"] == 0 and rates["layer4.1"] == 0.5
    assert [model.get_submodule(b).drop_path.drop_prob for b in blocks] == list(rates.values())
    built = timm.create_model("resnet18", pretrained=False, drop_path_rate=0.5)
    built_rates = [getattr(built.get_submodule(b).drop_path, "drop_prob", 0.0) for b in blocks]
    assert built_rates == pytest.approx(list(rates.values()))
    assert stochastic_depth_rates(3, 0.5) == [0.0, 0.25, 0.5]


def test_stochastic_depth_on_native_resnet_drops_the_residual_branch_per_sample():
    model = native_resnet()
    rates = enable_stochastic_depth_(model, 0.5)
    assert rates == {"resnet.encoder.stages.0.layers.0": 0.0, "resnet.encoder.stages.1.layers.0": 0.5}
    branch = model.get_submodule("resnet.encoder.stages.1.layers.0.layer")
    raw, after = Recorder(), Recorder()
    branch[-1].register_forward_hook(raw.post)  # the branch's output before the drop
    branch.register_forward_hook(after.post)  # and after it

    images = torch.randn(200, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.train()(images)
    samples = after.value.flatten(1)
    dropped = (samples == 0).all(1)
    assert torch.allclose(samples[~dropped], raw.value.flatten(1)[~dropped] * 2)
    assert dropped.float().mean().item() == pytest.approx(0.5, abs=0.15)
    with torch.no_grad():
        model.eval()(images)
    assert torch.equal(after.value, raw.value)


def test_stochastic_depth_on_an_unsupported_model_says_what_to_use():
    with pytest.raises(ValueError, match="timm"):
        enable_stochastic_depth_(nn.Sequential(nn.Linear(3, 2)), 0.5)


# --- Cyclic learning rate --------------------------------------------------------------------------------


class LearningRates(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.steps.append((state.global_step, [group["lr"] for group in optimizer.param_groups]))


def test_cyclic_lr_restarts_the_whole_network_num_cycles_times(tmp_path):
    lr, steps, cycles = 0.1, 12, 3
    args = RifleConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=lr,
        optim="sgd",
        seed=0,
        **FAST,
        **cyclic_lr_settings(cycles),
    )
    recorder = LearningRates()
    trainer = RifleTrainer(model=timm_wrapper_resnet(), args=args, train_dataset=RandomImages(), callbacks=[recorder])
    trainer.train()

    assert [step for step, _ in recorder.steps] == list(range(steps))
    for t, lrs in recorder.steps:
        expected = lr * 0.5 * (1 + math.cos(math.pi * ((cycles * t / steps) % 1)))
        assert lrs == pytest.approx([expected] * len(lrs))  # backbone and head groups alike
    first = [lrs[0] for _, lrs in recorder.steps]
    assert [t for t in range(1, steps) if first[t] > first[t - 1]] == [4, 8]  # cycles start at 0, 4, 8
    assert trainer.reinit_steps() == []


# --- DisturbLabel ----------------------------------------------------------------------------------------


def label_batch(labels):
    return [{"labels": torch.tensor(label)} for label in labels]


BASE = torch.utils.data.default_collate


def test_disturb_label_off_leaves_labels_and_on_draws_uniformly_from_all_classes():
    features = label_batch([0] * 20000)
    assert torch.equal(
        DisturbLabelCollator(BASE, 0.0, 4, seed=0)(features)["labels"], torch.zeros(20000, dtype=torch.long)
    )
    labels = DisturbLabelCollator(BASE, 1.0, 4, seed=0)(features)["labels"]
    assert labels.dtype == torch.long
    assert torch.bincount(labels, minlength=4).float().div(20000).tolist() == pytest.approx([0.25] * 4, abs=0.015)


def test_disturb_label_changes_a_fraction_alpha_times_one_minus_one_over_c():
    original = torch.randint(0, 5, (50000,), generator=torch.Generator().manual_seed(1))
    labels = DisturbLabelCollator(BASE, 0.2, 5, seed=0)(label_batch(original.tolist()))["labels"]
    assert (labels != original).float().mean().item() == pytest.approx(0.2 * (1 - 1 / 5), abs=0.006)


def test_disturb_label_is_reproducible_per_seed_and_picklable():
    features = label_batch(list(range(10)) * 10)

    def draws(collator, n=3):
        return [collator(features)["labels"] for _ in range(n)]

    first, again, other = (DisturbLabelCollator(BASE, 0.5, 10, seed=s) for s in (7, 7, 8))
    runs = draws(first), draws(again), draws(other)
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][0], runs[2][0])
    assert not torch.equal(runs[0][0], runs[0][1])  # the stream advances from batch to batch
    resumed = pickle.loads(pickle.dumps(first))
    assert torch.equal(resumed(features)["labels"], first(features)["labels"])


def test_disturb_label_workers_draw_independently_and_reproducibly():
    dataset = [{"labels": torch.tensor(0)}] * 16

    def epoch():
        torch.manual_seed(0)  # the DataLoader draws its workers' seeds from the global generator
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=4, num_workers=2, collate_fn=DisturbLabelCollator(BASE, 0.5, 1000, seed=3)
        )
        return [batch["labels"] for batch in loader]

    batches = epoch()
    assert not torch.equal(batches[0], batches[1])  # batches 0 and 1 come from different workers
    assert all(torch.equal(a, b) for a, b in zip(batches, epoch()))


def test_disturb_label_refuses_soft_or_multi_label_targets_and_wrap_collator_is_a_no_op_when_off():
    with pytest.raises(ValueError, match="integer class label"):
        DisturbLabelCollator(BASE, 0.1, 3)([{"labels": torch.tensor([0.0, 1.0])}] * 2)
    assert wrap_collator(BASE, BaselineArguments(), 3, 0) is BASE
    wrapped = wrap_collator(BASE, BaselineArguments(disturb_label=0.1), 3, 5)
    assert isinstance(wrapped, DisturbLabelCollator) and (wrapped.alpha, wrapped.num_classes, wrapped.seed) == (
        0.1,
        3,
        5,
    )


# --- Arguments and the method table ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fc_dropout", "fc_dropconnect", "cnn_dropout", "stochastic_depth", "disturb_label"])
@pytest.mark.parametrize("value", [1.0, -0.1, float("nan")])
def test_baseline_arguments_must_be_probabilities_below_one(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a probability in \\[0, 1\\)"):
        BaselineArguments(**{name: value})


def test_every_method_parses_from_its_flags_into_its_settings(tmp_path):
    assert list(METHODS) == [
        "original",
        "dropout",
        "dropconnect",
        "cnn_dropout",
        "stochastic_depth",
        "cyclic_lr",
        "disturb_label",
        "rifle",
        "rifle_a",
        "rifle_b",
        "rifle_fitted",
        "lp_ft",
        "freeze_then_unfreeze",
    ]
    assert method_flags("dropout") == ["--no_reinit_head", "--head_lr_schedule", "trainer", "--fc_dropout", "0.2"]
    parser = HfArgumentParser((RifleConfig, BaselineArguments))
    common = ["--output_dir", str(tmp_path), "--report_to", "none", "--use_cpu", "True"]
    for name, method in METHODS.items():
        config, baselines = parser.parse_args_into_dataclasses(common + method_flags(name))
        for key, value in method["rifle"].items():
            assert getattr(config, key) == value, (name, key)
        assert {k: getattr(baselines, k) for k in baselines.enabled} == method["baselines"], name
    config, _ = parser.parse_args_into_dataclasses(
        common + method_flags("cyclic_lr", lr_scheduler_kwargs={"num_cycles": 4})
    )
    assert config.lr_scheduler_type == "cosine_with_restarts" and config.lr_scheduler_kwargs == {"num_cycles": 4}
    assert config.method == "fine-tuning"
    assert METHOD_GRIDS["disturb_label"]["disturb_label"] == (0.05, 0.1, 0.2)
    assert BaselineArguments(fc_dropout=0.1, disturb_label=0.2).enabled == ["fc_dropout", "disturb_label"]
    with pytest.raises(ValueError, match="Unknown method"):
        method_flags("mixup")
    with pytest.raises(ValueError, match="Unknown settings"):
        method_flags("dropout", drop_rate=0.5)


def test_rifle_trains_with_every_model_baseline_on(tmp_path):
    model = timm_wrapper_resnet()
    _, head = find_head(model)
    apply_baselines_(
        model, BaselineArguments(fc_dropout=0.2, fc_dropconnect=0.2, cnn_dropout=0.2, stochastic_depth=0.5)
    )
    args = RifleConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        num_periods=2,
        learning_rate=0.01,
        optim="sgd",
        seed=0,
        **FAST,
    )
    collator = wrap_collator(torch.utils.data.default_collate, BaselineArguments(disturb_label=0.1), 4, args.seed)
    trainer = RifleTrainer(model=model, args=args, train_dataset=RandomImages(), data_collator=collator)
    before = head.weight.detach().clone()
    trainer.train()
    assert find_head(trainer.model)[1] is head and not torch.equal(head.weight, before)
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_cnn_dropout_covers_efficientnet_stages_but_not_vit_blocks():
    import timm

    stages = add_cnn_dropout_(timm.create_model("test_efficientnet"), 0.2)
    assert stages and all(name.startswith("blocks.") for name in stages)
    with pytest.raises(ValueError, match="No residual stages found in VisionTransformer"):
        add_cnn_dropout_(timm.create_model("test_vit"), 0.2)


def test_paper_baselines_extend_the_recipe(tmp_path):
    from hf_rifle.paper.baselines import BASELINES, method_flags
    from hf_rifle.recipe import main

    folders = write_image_folders(tmp_path / "images")
    flags = recipe_flags(
        tmp_path / "run",
        "--model_name_or_path",
        str(save_timm_hub_folder(tmp_path / "model")),
        "--train_dir",
        str(folders["train"]),
        *method_flags("original"),
        "--fc_dropout",
        "0.2",
        "--stochastic_depth",
        "0.5",
        "--disturb_label",
        "0.1",
    )
    with pytest.raises(ValueError, match="Unknown arguments for hf-rifle-train: --fc_dropout 0.2"):
        main(flags)  # the plain recipe does not know the baselines' flags
    metrics = main(flags, extensions=[BASELINES])
    assert "eval_accuracy" in metrics
    config = json.loads((tmp_path / "run" / "rifle_config.json").read_text())
    assert config["baselines"] == {
        "fc_dropout": 0.2,
        "fc_dropconnect": 0.0,
        "cnn_dropout": 0.0,
        "stochastic_depth": 0.5,
        "disturb_label": 0.1,
        "linear_probe_head": False,
        "frozen_epochs": 0,
        "body_lr_ratio": 1.0,
    }
    assert config["training"]["reinit_head"] is False
    card = (tmp_path / "run" / "README.md").read_text()
    assert "this run\nis the plain fine-tuning baseline" in card
    assert "| paper-kit baselines | fc_dropout=0.2, stochastic_depth=0.5, disturb_label=0.1 |" in card
