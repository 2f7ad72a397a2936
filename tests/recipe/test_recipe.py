"""End-to-end offline runs of the training recipe: train, evaluate, card, plot, reload, upload."""

import functools
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import timm
import torch
import transformers.trainer
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.hf_api import RepoUrl
from transformers import AutoModelForImageClassification, ConvNextImageProcessor, pipeline

from hf_rifle.recipe import main
from hf_rifle.recipe.train import hardware_defaults, parse_args
from hf_rifle.schedule import MIN_EPOCHS_PER_PERIOD

from ..helpers import CLASSES, native_resnet, recipe_flags, save_timm_hub_folder, write_image_folders

SENTINEL_TOKEN = "hf_SENTINELtoken0123456789"


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory):
    return write_image_folders(tmp_path_factory.mktemp("data") / "images")


@pytest.fixture(scope="module")
def timm_hub_folder(tmp_path_factory):
    return save_timm_hub_folder(tmp_path_factory.mktemp("timm_hub"))


@pytest.fixture(scope="module")
def native_hub_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("native_hub")
    native_resnet().save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def timm_run(image_folders, timm_hub_folder, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("timm_run")
    metrics = main(
        recipe_flags(
            output_dir,
            "--model_name_or_path",
            str(timm_hub_folder),
            "--train_dir",
            str(image_folders["train"]),
            "--validation_dir",
            str(image_folders["validation"]),
            "--test_dir",
            str(image_folders["test"]),
        )
    )
    return output_dir, metrics


def an_image():
    return PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8))


def test_recipe_writes_model_config_metrics_plot_and_card(timm_run, timm_hub_folder):
    output_dir, metrics = timm_run
    for name in (
        "model.safetensors",
        "config.json",
        "rifle_config.json",
        "all_results.json",
        "learning_curve.png",
        "README.md",
    ):
        assert (output_dir / name).is_file(), name
    assert {"eval_accuracy", "test_accuracy"} <= set(metrics)
    assert "eval_top5_accuracy" not in metrics  # two classes only
    saved = json.loads((output_dir / "all_results.json").read_text())
    assert saved["test_accuracy"] == metrics["test_accuracy"]
    config = json.loads((output_dir / "rifle_config.json").read_text())
    training = config["training"]
    assert (training["num_periods"], training["regularizer"], training["max_grad_norm"]) == (2, "l2", 0.0)
    assert config["data"]["resize_size"] == 32 and config["model"]["model_name_or_path"] == str(timm_hub_folder)
    saved_config = json.loads((output_dir / "config.json").read_text())
    assert saved_config["label_names"] == list(CLASSES)
    assert saved_config["pretrained_cfg"]["input_size"] == [3, 28, 28]  # timm keeps preprocessing in config.json


def test_model_card_records_method_results_and_reinit_steps(timm_run):
    output_dir, metrics = timm_run
    card = ModelCard.load(output_dir / "README.md")
    max_steps = 2 * 3  # 12 images, batch 4, 2 epochs: a head that cannot fit in 3 steps, kept under the default
    assert 'Re-initializations planned: 1, done: 0 (`reinit_when="fitted"`)' in card.text
    assert f"Head re-initialized at optimizer steps: none (of {max_steps})" in card.text
    assert "with **RIFLE** and **L2**" in card.text and "learning_curve.png" in card.text
    assert f"| test | {100 * metrics['test_accuracy']:.2f}% |" in card.text
    assert 'timm.create_model("hf-hub:' in card.text
    results = {result.dataset_split: result for result in card.data.eval_results}
    assert results["test"].metric_value == metrics["test_accuracy"]
    assert results["validation"].metric_value == metrics["eval_accuracy"]
    assert "rifle" in card.data.tags and card.data.pipeline_tag == "image-classification"


def test_saved_timm_model_reloads_in_timm_transformers_and_pipeline(timm_run):
    output_dir, _ = timm_run
    pixels = torch.randn(2, 3, 28, 28)
    timm_model = timm.create_model(f"local-dir:{output_dir}", pretrained=True).eval()
    transformers_model = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(timm_model(pixels), transformers_model(pixel_values=pixels).logits)
    assert transformers_model.config.id2label == dict(enumerate(CLASSES))
    assert tuple(timm_model.pretrained_cfg["input_size"]) == (3, 28, 28)  # evaluates at the trained resolution
    predictions = pipeline("image-classification", model=str(output_dir))(an_image())
    assert {prediction["label"] for prediction in predictions} == set(CLASSES)


def test_native_transformers_model_end_to_end(image_folders, native_hub_folder, tmp_path):
    metrics = main(
        recipe_flags(
            tmp_path,
            "--model_name_or_path",
            str(native_hub_folder),
            "--train_dir",
            str(image_folders["train"]),
            "--regularizer",
            "l2sp",
        )
    )
    assert "eval_accuracy" in metrics and "test_accuracy" not in metrics  # validation carved out of train
    model = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(model).__name__ == "ResNetForImageClassification" and model.config.id2label == dict(enumerate(CLASSES))
    assert {p["label"] for p in pipeline("image-classification", model=str(tmp_path))(an_image())} == set(CLASSES)
    assert "L2-SP" in (tmp_path / "README.md").read_text()
    assert (tmp_path / "preprocessor_config.json").is_file()


def test_demo_code_path_on_a_reduced_size(tmp_path, capsys):
    metrics = main(
        [
            "--output_dir",
            str(tmp_path),
            "--samples_per_class",
            "2",
            "--max_eval_samples",
            "20",
            "--num_train_epochs",
            "1",
            "--resize_size",
            "32",
            "--crop_size",
            "32",
            "--num_periods",
            "2",
            "--disable_tqdm",
            "True",
            "--save_strategy",
            "no",
        ]
    )
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and "test_top5_accuracy" in metrics
    printed = capsys.readouterr().out
    assert "test accuracy: top-1" in printed and str(tmp_path / "README.md") in printed
    # One epoch in 2 periods: under the default reinit_when="fitted" the fit test, not a warning, decides.
    summary = printed[printed.index("fine-tuning finished") :]
    assert "warnings about this run's settings" not in summary
    # 20 training images, batch 16: 2 steps, the head (not fit after one step) kept at step 1.
    assert re.search(
        r"head re-initializations: 0 of 1 planned done \(reinit_when='fitted'\): step 1: kept \(top-class loss "
        r"ratio 0\.\d\d\)",
        summary,
    )
    card = (tmp_path / "README.md").read_text()
    assert "In this run the head was re-drawn at a period start only once it had fit its training batches" in card
    assert "Warnings raised about this run's settings" not in card
    assert json.loads((tmp_path / "config.json").read_text())["architecture"] == "tf_efficientnet_lite0"


def test_bad_label_column_lists_the_columns_and_writes_nothing(image_folders, timm_hub_folder, tmp_path):
    output_dir = tmp_path / "run"
    with pytest.raises(
        ValueError, match=r"--label_column_name 'labl' is not a column.*image \(Image\), label \(ClassLabel"
    ):
        main(
            recipe_flags(
                output_dir,
                "--model_name_or_path",
                str(timm_hub_folder),
                "--train_dir",
                str(image_folders["train"]),
                "--label_column_name",
                "labl",
            )
        )
    assert not output_dir.exists()


def test_push_to_hub_uploads_the_output_folder_without_the_token(
    image_folders, timm_hub_folder, tmp_path, monkeypatch, caplog, capsys
):
    """The upload is intercepted at the huggingface_hub boundary; everything up to it runs for real."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    uploads = []

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, token=None, **kwargs):
        files = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file())
        uploads.append(
            {
                "repo_id": repo_id,
                "files": files,
                "ignore_patterns": ignore_patterns,
                "token": token,
                "env_token": os.environ.get("HF_TOKEN"),
            }
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    # transformers before 5.10 calls huggingface_hub's module-level functions, bound to a default HfApi at import
    for name, replacement in (("create_repo", create_repo), ("upload_folder", upload_folder)):
        if hasattr(transformers.trainer, name):
            monkeypatch.setattr(transformers.trainer, name, functools.partial(replacement, None))
    caplog.set_level(logging.DEBUG)
    output_dir = tmp_path / "run"
    main(
        recipe_flags(
            output_dir,
            "--model_name_or_path",
            str(timm_hub_folder),
            "--train_dir",
            str(image_folders["train"]),
            "--push_to_hub",
            "--hub_model_id",
            "someone/rifle-tiny",
            "--hub_token",
            SENTINEL_TOKEN,
        )
    )

    final = uploads[-1]
    assert final["repo_id"] == "someone/rifle-tiny"
    assert {"README.md", "model.safetensors", "config.json", "learning_curve.png", "rifle_config.json"} <= set(
        final["files"]
    )
    assert final["env_token"] == SENTINEL_TOKEN  # huggingface_hub reads it from the environment
    assert "someone/rifle-tiny" in (output_dir / "README.md").read_text()
    for path in output_dir.rglob("*"):
        if path.is_file():
            assert SENTINEL_TOKEN.encode() not in path.read_bytes(), path
    assert SENTINEL_TOKEN not in caplog.text and SENTINEL_TOKEN not in "".join(capsys.readouterr())


def test_recipe_help_lists_recipe_and_rifle_options_only(capsys):
    from hf_rifle.recipe import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert "--num_periods" in help_text and "--train_dir" in help_text and "--l2sp_alpha" in help_text
    assert "--fc_dropout" not in help_text and "--disturb_label" not in help_text
    # The defaults shown are those the recipe trains with, not TrainingArguments' (5e-05, adamw, linear).
    flat = " ".join(help_text.split())
    options = flat.split(" options: ", 1)[1]  # past the usage line
    for option, default in (
        ("learning_rate", "0.01"),
        ("optim", "sgd"),
        ("max_grad_norm", "0.0"),
        ("num_periods", "3"),
        ("num_train_epochs", "40"),  # the paper's (Sec. 4.1), not TrainingArguments' 3 epochs at batch size 8
        ("per_device_train_batch_size", "32"),
        ("reinit_when", "fitted"),
    ):
        option_help = options.split(f"--{option.replace('_', '-')} ", 1)[1].split(" --", 1)[0]
        assert f"(default: {default})" in option_help, option_help
    assert "the offline demo runs, with these defaults: --output_dir outputs/demo" in flat


def test_a_yaml_config_file_gets_the_recipe_defaults(image_folders, timm_hub_folder, tmp_path):
    import yaml

    from hf_rifle.recipe import parse_args

    settings = {
        "output_dir": str(tmp_path / "run"),
        "model_name_or_path": str(timm_hub_folder),
        "train_dir": str(image_folders["train"]),
        "num_periods": 2,
        "regularizer": "l2sp",
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    run = parse_args([str(path)])
    data_args, args = run.data, run.training
    assert (args.num_periods, args.regularizer, args.optim_args, args.remove_unused_columns) == (
        2,
        "l2sp",
        "momentum=0.9",
        False,
    )
    assert not data_args.demo and data_args.train_dir == settings["train_dir"]
    demo = parse_args(["--output_dir", str(tmp_path / "demo")])
    assert demo.data.demo and demo.data.samples_per_class == 20 and demo.training.num_train_epochs == 24
    # A newcomer's first run is one the project recommends: periods long enough that no warning fires.
    assert demo.training.num_train_epochs / demo.training.num_periods >= MIN_EPOCHS_PER_PERIOD
    assert demo.extensions == {}


def test_a_run_named_by_its_data_and_model_only_trains_with_the_papers_recipe(image_folders, timm_hub_folder, tmp_path):
    run = parse_args(["--train_dir", str(image_folders["train"]), "--model_name_or_path", str(timm_hub_folder)])
    args, data = run.training, run.data
    assert (args.num_train_epochs, args.per_device_train_batch_size, args.learning_rate) == (40, 32, 0.01)
    assert (args.optim.value, args.optim_args, args.lr_scheduler_type.value) == ("sgd", "momentum=0.9", "cosine")
    assert (args.weight_decay, data.resize_size, data.crop_size) == (1e-4, 256, 224)
    assert (args.reinit_when, args.max_grad_norm) == ("fitted", 0.0)


def test_a_resumed_run_keeps_the_settings_it_started_with_that_the_command_does_not_name(
    image_folders, timm_hub_folder, tmp_path, caplog
):
    """A run started before the defaults changed (3 epochs, the paper's re-init schedule) resumes with them when
    the restart names neither; a setting named again with another value is refused, as before."""
    from hf_rifle.recipe.train import CONFIG_FILE, resume_point, run_record

    data = ["--train_dir", str(image_folders["train"]), "--model_name_or_path", str(timm_hub_folder)]
    output = ["--output_dir", str(tmp_path / "run")]
    started = parse_args([*data, *output, "--num_train_epochs", "3", "--reinit_when", "always"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / CONFIG_FILE).write_text(json.dumps(run_record(started)))
    with caplog.at_level(logging.INFO, logger="hf_rifle"):
        resumed = parse_args([*data, *output])
    assert (resumed.training.num_train_epochs, resumed.training.reinit_when) == (3, "always")
    assert "--num_train_epochs 3.0, --reinit_when always" in caplog.text
    assert resume_point(str(tmp_path / "run"), run_record(resumed)) is None  # the same run: no refusal
    renamed = parse_args([*data, *output, "--reinit_when", "fitted"])
    with pytest.raises(ValueError, match=r"differs in: training\.reinit_when"):
        resume_point(str(tmp_path / "run"), run_record(renamed))


def test_local_weights_file_with_a_timm_architecture(image_folders, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = tmp_path / "weights.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=7).state_dict(), weights)
    metrics = main(
        recipe_flags(
            tmp_path / "run",
            "--model_name_or_path",
            str(weights),
            "--timm_architecture",
            "test_resnet",
            "--train_dir",
            str(image_folders["train"]),
        )
    )
    assert "eval_accuracy" in metrics
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'run'}", pretrained=True)
    assert reloaded.get_classifier().out_features == len(CLASSES)


def test_gpu_defaults_only_with_cuda():
    assert hardware_defaults(cuda=False, bf16_supported=False, cpus=16, gpus=0) == {
        "dataloader_pin_memory": False,
        "use_cpu": True,  # without it, torchrun on CPU runs independent copies instead of data-parallel training
    }
    assert hardware_defaults(cuda=False, bf16_supported=False, cpus=8, gpus=0, mps=True) == {
        "dataloader_pin_memory": False
    }
    assert hardware_defaults(cuda=True, bf16_supported=True, cpus=16, gpus=2) == {
        "bf16": True,
        "fp16": False,
        "dataloader_num_workers": 7,
        "dataloader_pin_memory": True,
        "dataloader_persistent_workers": True,
    }
    older_gpu = hardware_defaults(cuda=True, bf16_supported=False, cpus=4, gpus=1)
    assert older_gpu["fp16"] and not older_gpu["bf16"] and older_gpu["dataloader_num_workers"] == 3


def test_without_loader_workers_none_are_kept_alive():
    run = parse_args(["--train_dir", "x", "--dataloader_num_workers", "0", "--dataloader_persistent_workers", "True"])
    assert not run.training.dataloader_persistent_workers
