"""Offline tests for hf_rifle.models: tiny models saved the way the Hub stores them, then reloaded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it: these tests never need the Hub

import json
import logging
import pathlib

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.models import save_for_hf
from transformers import (
    AutoModelForImageClassification,
    ConvNextImageProcessor,
    ResNetConfig,
    ResNetForImageClassification,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    ViTImageProcessor,
    pipeline,
)

from hf_rifle.recipe import demo, models

TINY_TIMM_ARCHITECTURE = "test_resnet"
SOURCE_LABELS = ["w", "x", "y", "z", "v"]
NEW_LABELS = ["cat", "dog", "bird"]


def label_kwargs(names):
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
    }


def backbone_state(state_dict, head_prefix):
    """Every tensor except the classifier's, with TimmWrapper's 'timm_model.' prefix removed."""
    state_dict = {k.removeprefix("timm_model."): v for k, v in state_dict.items()}
    return {k: v for k, v in state_dict.items() if not k.startswith(head_prefix)}


def assert_same_tensors(actual, expected):
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


def random_image(size=64, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def tiny_timm_model():
    torch.manual_seed(0)
    return timm.create_model(TINY_TIMM_ARCHITECTURE, pretrained=False, num_classes=len(SOURCE_LABELS)).eval()


@pytest.fixture(scope="module", params=["safetensors", "pytorch_model.bin", "legacy_config"])
def timm_hub_folder(request, tiny_timm_model, tmp_path_factory):
    """A folder as timm's push_to_hf_hub uploads it, by default with the model_args.num_classes trap.

    'legacy_config' mimics older Hub timm repos (e.g. timm/resnet50.a1_in1k): no model_args, no label names.
    """
    folder = tmp_path_factory.mktemp("timm_hub")
    model_config = {"label_names": SOURCE_LABELS, "label_descriptions": {n: n.upper() for n in SOURCE_LABELS}}
    safe_serialization = request.param != "pytorch_model.bin"
    save_for_hf(tiny_timm_model, folder, model_config=model_config, safe_serialization=safe_serialization)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    # timm >= 1.0.31 writes model_args (num_classes among them) itself, as Hub repos it uploads have them
    config.setdefault("model_args", {"num_classes": len(SOURCE_LABELS)})
    assert config["model_args"]["num_classes"] == len(SOURCE_LABELS)
    if request.param == "legacy_config":
        for key in ("model_args", "label_names", "label_descriptions"):
            del config[key]
    config_path.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def tiny_native_model():
    torch.manual_seed(0)
    config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", **label_kwargs(SOURCE_LABELS)
    )
    return ResNetForImageClassification(config).eval()


@pytest.fixture(scope="module")
def native_processor():
    return ConvNextImageProcessor(
        size={"shortest_edge": 64}, crop_pct=0.875, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
    )


@pytest.fixture(scope="module")
def native_hub_folder(tiny_native_model, native_processor, tmp_path_factory):
    folder = tmp_path_factory.mktemp("native_hub")
    tiny_native_model.save_pretrained(folder)
    native_processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lite0_imagenet():
    return demo.load_efficientnet_lite0_imagenet()


# --- loading pretrained folders with a new head -----------------------------------------------


def test_timm_folder_loads_with_new_head_and_labels(timm_hub_folder, tiny_timm_model):
    model = models.load_image_classifier(str(timm_hub_folder), **label_kwargs(NEW_LABELS))

    assert isinstance(model, TimmWrapperForImageClassification)
    assert model.timm_model.fc.weight.shape == (len(NEW_LABELS), tiny_timm_model.num_features)
    assert model.config.id2label == dict(enumerate(NEW_LABELS))
    assert model.config.label2id == {name: i for i, name in enumerate(NEW_LABELS)}
    assert "num_classes" not in (model.config.model_args or {})
    assert_same_tensors(backbone_state(model.state_dict(), "fc."), backbone_state(tiny_timm_model.state_dict(), "fc."))


def test_head_of_the_same_size_is_kept(timm_hub_folder, tiny_timm_model):
    renamed = [f"new_{name}" for name in SOURCE_LABELS]
    model = models.load_image_classifier(str(timm_hub_folder), **label_kwargs(renamed))

    torch.testing.assert_close(model.timm_model.fc.weight, tiny_timm_model.fc.weight)
    assert model.config.id2label == dict(enumerate(renamed))


@pytest.fixture
def load_logs(caplog, monkeypatch):
    """The log records of a test, transformers' included (its loggers do not propagate to the root by default)."""
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)
    with caplog.at_level(logging.INFO):
        yield caplog


def test_a_replaced_head_is_said_in_one_line_instead_of_the_load_report(timm_hub_folder, load_logs):
    models.load_image_classifier(str(timm_hub_folder), **label_kwargs(NEW_LABELS))

    assert [record.getMessage() for record in load_logs.records] == [
        "Replaced the pretrained 5-class head (timm_model.fc) by a new 3-class head for this dataset's labels, "
        "as intended for fine-tuning on new labels."
    ]


def test_the_load_report_stays_when_it_reports_more_than_the_head(native_hub_folder, tmp_path, load_logs):
    import shutil

    from safetensors.torch import load_file

    folder = shutil.copytree(native_hub_folder, tmp_path / "extra-weights")
    weights = load_file(folder / "model.safetensors")
    save_file({**weights, "leftover.weight": torch.zeros(2)}, folder / "model.safetensors", metadata={"format": "pt"})
    models.load_image_classifier(str(folder), **label_kwargs(NEW_LABELS))

    (report,) = [record.getMessage() for record in load_logs.records]
    assert "LOAD REPORT" in report and "leftover.weight" in report and "classifier.1.weight" in report


def test_native_folder_loads_with_new_head_and_labels(native_hub_folder, tiny_native_model):
    model = models.load_image_classifier(str(native_hub_folder), **label_kwargs(NEW_LABELS))

    assert isinstance(model, ResNetForImageClassification)
    assert model.classifier[-1].weight.shape == (len(NEW_LABELS), 16)
    assert model.config.id2label == dict(enumerate(NEW_LABELS))
    assert_same_tensors(
        backbone_state(model.state_dict(), "classifier."), backbone_state(tiny_native_model.state_dict(), "classifier.")
    )


def test_inconsistent_labels_are_refused(native_hub_folder):
    with pytest.raises(ValueError, match="id2label must have exactly the ids"):
        models.load_image_classifier(
            str(native_hub_folder), num_labels=3, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1}
        )
    with pytest.raises(ValueError, match="inverse of id2label"):
        models.load_image_classifier(
            str(native_hub_folder), num_labels=2, id2label={0: "a", 1: "b"}, label2id={"a": 1, "b": 0}
        )


def test_unknown_model_error_names_the_problem():
    """The tests run offline: a Hub id not in the cache says so (tests/hub has the errors from a Hub server)."""
    with pytest.raises(FileNotFoundError, match="model 'no-such-owner/no-such-model' at revision 'main' is not in"):
        models.load_image_classifier("no-such-owner/no-such-model", **label_kwargs(NEW_LABELS))
    with pytest.raises(OSError, match="'no/such/path' is neither a local folder or file nor a Hub repository id"):
        models.load_image_classifier("no/such/path", **label_kwargs(NEW_LABELS))


def test_weights_file_is_redirected_to_the_file_loader(tmp_path):
    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1)}, weights)
    with pytest.raises(ValueError, match="load_timm_weights_file"):
        models.load_image_classifier(str(weights), **label_kwargs(NEW_LABELS))


# --- saving so that timm and transformers both load ------------------------------------------


def logits_of(model, pixel_values):
    with torch.no_grad():
        output = model.eval()(pixel_values)
    return getattr(output, "logits", output)


def test_saved_timm_classifier_loads_in_timm_transformers_and_pipeline(timm_hub_folder, tmp_path):
    model = models.load_image_classifier(str(timm_hub_folder), **label_kwargs(NEW_LABELS)).eval()
    out = models.save_image_classifier(model, tmp_path / "saved")
    config = json.loads((out / "config.json").read_text())
    pixel_values = torch.randn(2, 3, 64, 64)
    expected = logits_of(model, pixel_values)

    assert config["architecture"] == TINY_TIMM_ARCHITECTURE
    assert config["num_classes"] == len(NEW_LABELS)
    assert config["label_names"] == NEW_LABELS
    assert "num_classes" not in config.get("model_args", {})
    assert "label_descriptions" not in config

    timm_model = timm.create_model(f"local-dir:{out}", pretrained=True)
    torch.testing.assert_close(logits_of(timm_model, pixel_values), expected)
    assert timm_model.pretrained_cfg["label_names"] == NEW_LABELS

    reloaded = AutoModelForImageClassification.from_pretrained(out)
    torch.testing.assert_close(logits_of(reloaded, pixel_values), expected)
    assert reloaded.config.id2label == dict(enumerate(NEW_LABELS))

    classifier = pipeline("image-classification", model=str(out))
    image = random_image()
    predictions = classifier(image, top_k=len(NEW_LABELS))
    processed = classifier.image_processor(image, return_tensors="pt")["pixel_values"]
    probabilities = logits_of(model, processed).softmax(-1)[0]
    assert {p["label"]: pytest.approx(p["score"], abs=1e-5) for p in predictions} == {
        name: probabilities[i].item() for i, name in enumerate(NEW_LABELS)
    }

    again = models.load_image_classifier(str(out), **label_kwargs(NEW_LABELS))
    torch.testing.assert_close(logits_of(again, pixel_values), expected)


def test_saved_native_classifier_loads_in_transformers_and_pipeline(native_hub_folder, native_processor, tmp_path):
    model = models.load_image_classifier(str(native_hub_folder), **label_kwargs(NEW_LABELS)).eval()
    out = models.save_image_classifier(model, tmp_path / "saved", image_processor=native_processor)
    pixel_values = torch.randn(2, 3, 64, 64)

    reloaded = AutoModelForImageClassification.from_pretrained(out)
    torch.testing.assert_close(logits_of(reloaded, pixel_values), logits_of(model, pixel_values))
    predictions = pipeline("image-classification", model=str(out))(random_image())
    assert {p["label"] for p in predictions} <= set(NEW_LABELS)


def test_save_makes_a_hand_built_timm_wrapper_readable_by_timm(tmp_path):
    config = TimmWrapperConfig(architecture=TINY_TIMM_ARCHITECTURE, **label_kwargs(NEW_LABELS))
    model = TimmWrapperForImageClassification(config).eval()
    out = models.save_image_classifier(model, tmp_path / "saved")
    pixel_values = torch.randn(1, 3, 64, 64)

    timm_model = timm.create_model(f"local-dir:{out}", pretrained=True)
    torch.testing.assert_close(logits_of(timm_model, pixel_values), logits_of(model, pixel_values))
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]


# --- bare weight files ------------------------------------------------------------------------


@pytest.mark.parametrize("filename", ["weights.safetensors", "weights.pth", "weights.bin"])
def test_weights_file_loads_into_timm_wrapper_with_new_head(filename, tiny_timm_model, tmp_path):
    path = tmp_path / filename
    state_dict = tiny_timm_model.state_dict()
    if path.suffix == ".safetensors":
        save_file(state_dict, path)
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, path)

    model = models.load_timm_weights_file(TINY_TIMM_ARCHITECTURE, path, **label_kwargs(NEW_LABELS))

    assert isinstance(model, TimmWrapperForImageClassification)
    assert model.timm_model.fc.weight.shape == (len(NEW_LABELS), tiny_timm_model.num_features)
    assert model.config.id2label == dict(enumerate(NEW_LABELS))
    assert_same_tensors(backbone_state(model.state_dict(), "fc."), backbone_state(state_dict, "fc."))


def test_weights_file_for_another_architecture_is_refused(tiny_timm_model, tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(tiny_timm_model.state_dict(), path)
    with pytest.raises(ValueError, match="do not fit timm architecture 'resnet10t'"):
        models.load_timm_weights_file("resnet10t", path, **label_kwargs(NEW_LABELS))


class NotATensor:
    pass


class RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_pickle_with_non_tensor_objects_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(1), "extra": NotATensor()}, path)
    with pytest.raises(ValueError, match="Refusing to load"):
        models.load_weights_file(path)


def test_pickle_that_would_run_code_is_refused_before_running_it(tmp_path):
    path, marker = tmp_path / "weights.pth", tmp_path / "code_ran"
    torch.save({"weight": RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(ValueError, match="Refusing to load"):
        models.load_weights_file(path)
    assert not marker.exists()


def test_non_tensor_values_and_unknown_suffixes_are_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(1), "epoch": 3}, path)
    with pytest.raises(ValueError, match="non-tensor entries: \\['epoch'\\]"):
        models.load_weights_file(path)
    with pytest.raises(ValueError, match="Unsupported weights file"):
        models.load_weights_file(tmp_path / "weights.npz")


# --- preprocessing ---------------------------------------------------------------------------


def test_image_processing_config_of_timm_wrapper_uses_checkpoint_pretrained_cfg(timm_hub_folder):
    model = models.load_image_classifier(str(timm_hub_folder), **label_kwargs(NEW_LABELS))
    assert models.image_processing_config(model) == {
        "input_size": (3, 160, 160),
        "interpolation": "bilinear",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "crop_pct": 0.95,
        "crop_mode": "center",
    }


def test_image_processing_config_of_native_model_comes_from_its_processor(native_hub_folder):
    model = models.load_image_classifier(str(native_hub_folder), **label_kwargs(NEW_LABELS))
    assert models.image_processing_config(model) == {
        "input_size": (3, 64, 64),
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": 0.875,
        "crop_mode": "center",
    }


def test_fixed_size_processor_translates_to_squash_resize():
    processor = ViTImageProcessor(size={"height": 96, "width": 128})
    config = models.timm_data_config_from_processor(processor)
    assert (config["input_size"], config["crop_pct"], config["crop_mode"]) == ((3, 96, 128), 1.0, "squash")


# --- offline demo model ------------------------------------------------------------------------


def test_lite0_imagenet_weights_predict_imagenet_classes(lite0_imagenet):
    top5 = demo.check_imagenet_prediction(lite0_imagenet)
    assert top5["flower.jpg"][0] == "daisy"
    assert top5["china.jpg"][0] == "palace"


def test_a_wrong_mapping_fails_the_imagenet_check(lite0_imagenet):
    wrong = timm.create_model(demo.DEMO_ARCHITECTURE, pretrained=False)
    state_dict = lite0_imagenet.state_dict()
    swapped = {  # same shapes, wrong tensors: every batch norm's weight and bias exchanged
        k: state_dict[k[: -len("weight")] + "bias"] if k.endswith("bn1.weight") else v for k, v in state_dict.items()
    }
    wrong.load_state_dict(swapped)
    with pytest.raises(ValueError, match="Implausible ImageNet predictions"):
        demo.check_imagenet_prediction(wrong)


def test_positional_mapping_refuses_mismatched_shapes(tiny_timm_model, lite0_imagenet):
    with pytest.raises(ValueError, match="Cannot map by position"):
        demo.map_state_dict_in_order(tiny_timm_model.state_dict(), lite0_imagenet.state_dict())


def test_imagenet_label_names_are_unique():
    names = demo.imagenet_label_names()
    assert len(names) == len(set(names)) == 1000
    assert names[0] == "tench, Tinca tinca"


def test_demo_checkpoint_runs_the_hub_timm_code_path(lite0_imagenet, tmp_path):
    folder = demo.materialize_demo_checkpoint(tmp_path / "demo")

    as_timm = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert demo.check_imagenet_prediction(as_timm)["flower.jpg"][0] == "daisy"

    model = models.load_image_classifier(str(folder), **label_kwargs(NEW_LABELS))
    assert isinstance(model, TimmWrapperForImageClassification)
    assert model.timm_model.classifier.weight.shape == (len(NEW_LABELS), 1280)
    assert_same_tensors(
        backbone_state(model.state_dict(), "classifier."), backbone_state(lite0_imagenet.state_dict(), "classifier.")
    )
    assert models.image_processing_config(model)["mean"] == (0.5, 0.5, 0.5)


def assert_trainer_save_model_is_timm_readable(model, tmp_path):
    from transformers import Trainer, TrainingArguments

    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True))
    trainer.save_model(str(tmp_path / "saved"))
    pixel_values = torch.randn(1, 3, 64, 64)

    timm_model = timm.create_model(f"local-dir:{tmp_path / 'saved'}", pretrained=True)
    torch.testing.assert_close(logits_of(timm_model, pixel_values), logits_of(model, pixel_values))
    assert timm_model.pretrained_cfg["label_names"] == NEW_LABELS


def test_trainer_save_model_of_a_loaded_timm_folder_is_timm_readable(timm_hub_folder, tmp_path):
    model = models.load_image_classifier(str(timm_hub_folder), **label_kwargs(NEW_LABELS))
    assert_trainer_save_model_is_timm_readable(model, tmp_path)


def test_trainer_save_model_of_a_loaded_weights_file_is_timm_readable(tiny_timm_model, tmp_path):
    weights = tmp_path / "weights.safetensors"
    save_file(tiny_timm_model.state_dict(), weights)
    model = models.load_timm_weights_file(TINY_TIMM_ARCHITECTURE, weights, **label_kwargs(NEW_LABELS))
    assert_trainer_save_model_is_timm_readable(model, tmp_path)
