"""LP-FT and freeze-then-unfreeze, the head-first methods users pick instead of RIFLE, checked against their
definitions on real (tiny) training runs through the recipe."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression
from torch import nn
from transformers import TrainerCallback

from hf_rifle import find_head
from hf_rifle.optim import HEAD_GROUP_KEY
from hf_rifle.paper.baselines import BASELINES, BaselineArguments, method_flags
from hf_rifle.paper.freeze_then_unfreeze import frozen_steps
from hf_rifle.paper.linear_probe import (
    PROBE_C_GRID,
    PROBE_MAX_ITER,
    fit_linear_probe,
    layer_inputs,
    linear_layer_of,
    probe_and_load_,
)
from hf_rifle.recipe import main

from ..helpers import StopAt, recipe_flags, save_timm_hub_folder

CLASSES = ("red", "blue")  # 8 training images per class, batch 4: 4 optimizer steps per epoch


def write_colour_folders(root: Path, sizes=(("train", 8), ("validation", 4))) -> dict[str, Path]:
    """Class folders whose images a linear probe can tell apart: noise over a red or a blue cast."""
    import PIL.Image

    rng = np.random.default_rng(0)
    folders = {}
    for split, per_class in sizes:
        for channel, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for index in range(per_class):
                pixels = rng.integers(0, 120, size=(32, 32, 3), dtype=np.uint8)
                pixels[..., 2 * channel] += 120
                PIL.Image.fromarray(pixels).save(root / split / name / f"{index}.png")
        folders[split] = root / split
    return folders


class ColourRuns:
    """Recipe runs of a tiny timm model on `write_colour_folders`' images, with a method's flags."""

    def __init__(self, root: Path):
        self.folders = write_colour_folders(root / "images")
        self.model = save_timm_hub_folder(root / "model")

    def flags(self, output_dir, method, *extra):
        return recipe_flags(
            output_dir,
            *("--model_name_or_path", str(self.model)),
            *("--train_dir", str(self.folders["train"]), "--validation_dir", str(self.folders["validation"])),
            *("--num_train_epochs", "3", "--seed", "5"),
            *method_flags(method),
            *extra,
        )

    def batches(self, split: str, run_dir: Path):
        """The split as the recipe evaluates it (resized to 32, center 28 crop), normalized as the run's saved
        model says, in one batch of (inputs, labels)."""
        import PIL.Image
        from torchvision.transforms.v2 import functional as F

        config = json.loads((run_dir / "config.json").read_text())["pretrained_cfg"]
        mean, std = (torch.tensor(config[key]).view(1, 3, 1, 1) for key in ("mean", "std"))
        images, labels = [], []
        for label, name in enumerate(sorted(CLASSES)):
            for file in sorted((self.folders[split] / name).glob("*.png")):
                image = F.pil_to_tensor(PIL.Image.open(file).convert("RGB"))
                images.append(F.center_crop(F.resize(image, 32, antialias=True), 28))
                labels.append(label)
        pixels = torch.stack(images).float() / 255
        yield {"pixel_values": (pixels - mean) / std}, torch.tensor(labels)


@pytest.fixture(scope="module")
def colour_runs(tmp_path_factory):
    return ColourRuns(tmp_path_factory.mktemp("head_first"))


class Snapshots(TrainerCallback):
    """The model's state at the first step's start and at each epoch's end, and each step's learning rates."""

    def __init__(self):
        self.at_start, self.after_epoch, self.rates, self.model = None, [], [], None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.at_start, self.model = clone(model.state_dict()), model

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        groups = optimizer.param_groups
        head = [g["lr"] for g in groups if g.get(HEAD_GROUP_KEY)]
        body = [g["lr"] for g in groups if not g.get(HEAD_GROUP_KEY)]
        self.rates.append((state.global_step, head, body))

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self.after_epoch.append(clone(model.state_dict()))


def clone(state: dict) -> dict:
    return {name: tensor.detach().clone() for name, tensor in state.items()}


def differs(a: dict, b: dict, names) -> list[str]:
    return [name for name in names if not torch.equal(a[name], b[name])]


# ------------------------------------------------------------------------------------------------------------
# LP-FT


def test_the_probe_is_the_validation_best_c_folded_into_a_head_over_raw_features():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 20)) * 2
    train_labels, validation_labels = np.repeat(np.arange(3), 10), np.repeat(np.arange(3), 6)
    train = centres[train_labels] + rng.normal(size=(30, 20)) * 3 + 5  # offset and scale: the folding must undo both
    validation = centres[validation_labels] + rng.normal(size=(18, 20)) * 3 + 5
    probe = fit_linear_probe(train, train_labels, validation, validation_labels, num_classes=3)

    mean, std = train.mean(), train.std()
    accuracies = []
    for c in PROBE_C_GRID:  # each C fit from scratch (the probe warm-starts along the grid: the same optimum)
        reference = LogisticRegression(C=c, max_iter=10 * PROBE_MAX_ITER).fit((train - mean) / std, train_labels)
        accuracies.append(np.mean(reference.predict((validation - mean) / std) == validation_labels))
    assert probe.validation_accuracy == max(accuracies)
    assert probe.C == PROBE_C_GRID[int(np.argmax(accuracies))]  # the smallest C among ties
    chosen = LogisticRegression(C=probe.C, max_iter=10 * PROBE_MAX_ITER).fit((train - mean) / std, train_labels)
    np.testing.assert_allclose(
        train @ probe.weight.T + probe.bias, chosen.decision_function((train - mean) / std), atol=2e-3
    )


def test_a_binary_probe_is_a_two_output_head_with_the_same_decisions():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 8)
    features = rng.normal(size=(16, 6)) + labels[:, None]
    probe = fit_linear_probe(features, labels, features, labels, num_classes=2)
    assert probe.weight.shape == (2, 6)
    assert probe.train_accuracy == np.mean((features @ probe.weight.T + probe.bias).argmax(1) == labels) > 0.5
    with pytest.raises(ValueError, match=r"classes \[2\] have none"):
        fit_linear_probe(features, labels, features, labels, num_classes=3)


def test_a_head_that_normalizes_before_its_linear_layer_gets_the_probe_of_what_that_layer_sees():
    """LeViT-like head, BatchNorm then Linear: the probe is fit on the linear layer's input, so the loaded head
    classifies the training split as the probe did (fit on the head's input, its BatchNorm's negative scale would
    turn every decision around)."""

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(6, 8)
            self.head = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 3))

        def forward(self, x):
            return self.head(self.body(x))

    torch.manual_seed(0)
    model = Classifier()
    with torch.no_grad():
        model.head[0].weight.fill_(-2.0)
        model.head[0].running_mean.fill_(1.0)
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(3), 20)
    inputs = torch.as_tensor(rng.normal(size=(3, 6))[labels] * 3 + rng.normal(size=(60, 6)), dtype=torch.float32)
    batches = [({"x": inputs}, torch.as_tensor(labels))]
    probe = probe_and_load_(model, batches, batches, head_module="head")
    with torch.no_grad():
        accuracy = (model.eval()(inputs).argmax(1).numpy() == labels).mean()
    assert accuracy == probe.train_accuracy > 0.9


@pytest.mark.slow  # two recipe runs
def test_lp_ft_fine_tunes_from_the_probe_head_which_classifies_the_training_split(colour_runs, tmp_path):
    snapshots = Snapshots()
    main(colour_runs.flags(tmp_path / "lp_ft", "lp_ft"), callbacks=[snapshots], extensions=[BASELINES])
    history = json.loads((tmp_path / "lp_ft" / "trainer_state.json").read_text())["log_history"]
    (probe,) = [entry for entry in history if "linear_probe_C" in entry]
    assert probe["linear_probe_C"] in PROBE_C_GRID and probe["linear_probe_seconds"] > 0

    # The head at the first step is the probe: on the training split's center crops (as the probe saw them) it
    # classifies better than chance, where the model's own random head does not.
    main(colour_runs.flags(tmp_path / "plain", "original"), callbacks=[plain := Snapshots()], extensions=[BASELINES])
    model = snapshots.model
    name, head = find_head(model)
    head_names = [n for n in snapshots.at_start if n.startswith(name + ".")]
    assert differs(snapshots.at_start, plain.at_start, head_names) == head_names
    assert differs(snapshots.at_start, plain.at_start, set(snapshots.at_start) - set(head_names)) == []
    accuracy = {}
    for label, snapshot in (("probe", snapshots.at_start), ("random", plain.at_start)):
        model.load_state_dict(snapshot)
        linear = linear_layer_of(head)
        features, labels = layer_inputs(model, linear, colour_runs.batches("train", tmp_path / "lp_ft"))
        logits = features @ linear.weight.detach().numpy().T + linear.bias.detach().numpy()
        accuracy[label] = np.mean(logits.argmax(1) == labels)
    assert accuracy["probe"] == probe["linear_probe_train_accuracy"] > 0.5 >= accuracy["random"] - 0.125
    # ... and fine-tuning moves on from it
    assert differs(snapshots.after_epoch[0], snapshots.at_start, head_names) == head_names


# ------------------------------------------------------------------------------------------------------------
# Freeze-then-unfreeze


def test_freeze_then_unfreeze_keeps_the_body_bit_for_bit_through_epoch_one_then_trains_it_at_the_ratio(
    colour_runs, tmp_path
):
    snapshots = Snapshots()
    main(colour_runs.flags(tmp_path / "ftu", "freeze_then_unfreeze"), callbacks=[snapshots], extensions=[BASELINES])
    name, _ = find_head(snapshots.model)
    head_names = {n for n in snapshots.at_start if n.startswith(name + ".")}
    body_names = set(snapshots.at_start) - head_names  # parameters and buffers: BatchNorm statistics included
    first_epoch = snapshots.after_epoch[0]
    assert differs(first_epoch, snapshots.at_start, body_names) == []
    assert set(differs(first_epoch, snapshots.at_start, head_names)) == head_names
    moved = differs(snapshots.after_epoch[1], first_epoch, body_names)
    assert any(n.endswith("weight") and "bn" not in n for n in moved)
    assert any(n.endswith("running_mean") for n in moved)

    steps_per_epoch = frozen_steps(num_batches=4, gradient_accumulation_steps=1, frozen_epochs=1)
    for step, head_rates, body_rates in snapshots.rates:
        assert len(set(head_rates)) == 1 and len(set(body_rates)) == 1
        if head_rates[0] > 0:
            assert body_rates[0] == pytest.approx(0.01 * head_rates[0], rel=1e-12), step
    assert len(snapshots.rates) == 3 * steps_per_epoch == 12


def test_a_run_set_in_steps_freezes_the_body_for_its_first_epoch_of_steps(colour_runs, tmp_path):
    """6 steps of 4 per epoch: frozen for 4 (not the first third of the run), then trained; a run too short to
    unfreeze is refused before its first step."""
    snapshots = Snapshots()
    flags = colour_runs.flags(tmp_path / "steps", "freeze_then_unfreeze", "--max_steps", "6")
    main(flags, callbacks=[snapshots], extensions=[BASELINES])
    name, _ = find_head(snapshots.model)
    body_names = {n for n in snapshots.at_start if not n.startswith(name + ".")}
    assert differs(snapshots.after_epoch[0], snapshots.at_start, body_names) == []
    assert differs(snapshots.after_epoch[1], snapshots.after_epoch[0], body_names)
    assert len(snapshots.rates) == 6
    too_short = colour_runs.flags(tmp_path / "short", "freeze_then_unfreeze", "--max_steps", "4")
    with pytest.raises(ValueError, match=r"frozen_epochs=1 freezes the body for 4 optimizer steps, but the run has 4"):
        main(too_short, extensions=[BASELINES])
    assert not (tmp_path / "short").exists()  # refused before anything was written: a corrected rerun starts clean


@pytest.mark.slow  # three recipe runs each
@pytest.mark.parametrize("method", ["freeze_then_unfreeze", "lp_ft"])
def test_a_resumed_head_first_run_ends_on_the_uninterrupted_weights(colour_runs, tmp_path, method):
    """Resumed mid-way through its frozen epoch (or after LP-FT's probe), the run freezes, scales and probes exactly
    as the uninterrupted one did: the probe is not fit again, the body's learning rate is not scaled twice."""
    main(colour_runs.flags(tmp_path / "full", method), extensions=[BASELINES])
    interrupted = colour_runs.flags(tmp_path / "split", method, "--save_strategy", "steps", "--save_steps", "2")
    main(interrupted, callbacks=[StopAt(2)], extensions=[BASELINES])
    main(interrupted, extensions=[BASELINES])
    full, resumed = (load_file(tmp_path / name / "model.safetensors") for name in ("full", "split"))
    assert [key for key in full if not torch.equal(full[key], resumed[key])] == []
    history = json.loads((tmp_path / "split" / "trainer_state.json").read_text())["log_history"]
    assert sum("linear_probe_C" in entry for entry in history) == (method == "lp_ft")


def test_head_first_settings_are_checked_and_recorded():
    assert BaselineArguments(frozen_epochs=1, body_lr_ratio=0.01).enabled == ["frozen_epochs", "body_lr_ratio"]
    for bad in ({"frozen_epochs": -1}, {"body_lr_ratio": 0.0}, {"body_lr_ratio": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            BaselineArguments(**bad)
    assert frozen_steps(num_batches=8, gradient_accumulation_steps=2, frozen_epochs=1) == 4
    assert frozen_steps(num_batches=9, gradient_accumulation_steps=2, frozen_epochs=2) == 10  # a partial step counts
    assert frozen_steps(num_batches=1, gradient_accumulation_steps=4, frozen_epochs=1) == 1
