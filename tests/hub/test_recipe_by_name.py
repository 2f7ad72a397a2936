"""`hf-rifle-train` with a Hub dataset and model named by id, over HTTP from a real Hub-protocol server (olah on
loopback): revisions pinned to a branch and to a commit, a configuration, an imagefolder dataset; and what the
recipe writes, uploaded to that Hub, loads back by id as users load it."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard

from ..helpers import CLASSES, recipe_flags
from .conftest import run_python, run_recipe
from .repos import MAIN_CLASSES, MAIN_MEAN, SHADES_CLASSES, V1_CLASSES, V1_MEAN

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

LOAD_BY_NAME = Path(__file__).with_name("load_by_name.py")


def train_by_name(hub, tmp_path_factory, name: str, *flags: str) -> Path:
    """A recipe run with its own empty Hub cache; its output folder."""
    root = tmp_path_factory.mktemp(name)
    result = run_recipe(hub.env(root / "hf-home"), *recipe_flags(root / "run", *flags))
    assert result.returncode == 0, result.stderr[-4000:]
    return root / "run"


def labels(output_dir: Path) -> list[str]:
    """The class names a saved model predicts (timm's format keeps them as `label_names`)."""
    config = json.loads((output_dir / "config.json").read_text())
    if "label_names" in config:
        return config["label_names"]
    return [config["id2label"][str(i)] for i in range(len(config["id2label"]))]


def card_setting(output_dir: Path, name: str) -> str:
    match = re.search(rf"^\| {name} \| (.*) \|$", (output_dir / "README.md").read_text(), re.MULTILINE)
    return match.group(1) if match else ""


@pytest.fixture(scope="module")
def native_run(loopback_hub, tmp_path_factory):
    hub, _ = loopback_hub
    return train_by_name(
        hub,
        tmp_path_factory,
        "native",
        "--dataset_name",
        "hf-rifle-tests/colors",
        "--model_name_or_path",
        "hf-rifle-tests/tiny-resnet",
    )


@pytest.fixture(scope="module")
def timm_imagefolder_run(loopback_hub, tmp_path_factory):
    hub, _ = loopback_hub
    return train_by_name(
        hub,
        tmp_path_factory,
        "timm",
        "--dataset_name",
        "hf-rifle-tests/pets",
        "--model_name_or_path",
        "hf-rifle-tests/tiny-timm",
    )


def test_trains_by_hub_names_and_the_card_links_both(loopback_hub, native_run):
    _, published = loopback_hub
    assert labels(native_run) == MAIN_CLASSES
    assert json.loads((native_run / "preprocessor_config.json").read_text())["image_mean"] == MAIN_MEAN
    assert "eval_accuracy" in json.loads((native_run / "all_results.json").read_text())
    card = ModelCard.load(native_run / "README.md")
    assert card.data.base_model == "hf-rifle-tests/tiny-resnet"
    assert card.data.datasets == ["hf-rifle-tests/colors"]
    assert card.data.eval_results[0].dataset_type == "hf-rifle-tests/colors"
    assert "(https://huggingface.co/datasets/hf-rifle-tests/colors)" in card.text
    assert "(https://huggingface.co/hf-rifle-tests/tiny-resnet)" in card.text
    assert card_setting(native_run, "dataset revision") == f"main (commit {published.colors_main})"
    assert card_setting(native_run, "model revision") == f"main (commit {published.resnet_main})"


def test_an_imagefolder_dataset_and_a_timm_model_by_name(timm_imagefolder_run):
    assert labels(timm_imagefolder_run) == sorted(CLASSES)
    config = json.loads((timm_imagefolder_run / "config.json").read_text())
    assert config["architecture"] == "test_resnet"


@pytest.mark.parametrize("pinned", ["dataset by branch, model by commit", "dataset by commit, model by branch"])
def test_pinned_revisions_read_that_revision_only(loopback_hub, tmp_path_factory, pinned):
    """The main branch has a fourth class and other normalization means: neither may leak into a v1 run."""
    hub, published = loopback_hub
    by_branch = pinned.startswith("dataset by branch")
    dataset_revision = "v1" if by_branch else published.colors_first
    model_revision = published.resnet_first if by_branch else "v1"
    output_dir = train_by_name(
        hub,
        tmp_path_factory,
        "pinned",
        "--dataset_name",
        "hf-rifle-tests/colors",
        "--dataset_revision",
        dataset_revision,
        "--model_name_or_path",
        "hf-rifle-tests/tiny-resnet",
        "--model_revision",
        model_revision,
    )
    assert labels(output_dir) == V1_CLASSES
    assert json.loads((output_dir / "preprocessor_config.json").read_text())["image_mean"] == V1_MEAN
    if by_branch:
        assert card_setting(output_dir, "dataset revision") == f"v1 (commit {published.colors_v1})"
        assert card_setting(output_dir, "model revision") == published.resnet_first
    else:
        assert card_setting(output_dir, "dataset revision") == published.colors_first
        assert card_setting(output_dir, "model revision") == f"v1 (commit {published.resnet_v1})"
    recorded = json.loads((output_dir / "rifle_config.json").read_text())
    assert (recorded["data"]["dataset_revision"], recorded["model"]["model_revision"]) == (
        dataset_revision,
        model_revision,
    )


def test_a_dataset_configuration_by_name(loopback_hub, tmp_path_factory):
    hub, _ = loopback_hub
    output_dir = train_by_name(
        hub,
        tmp_path_factory,
        "configuration",
        "--dataset_name",
        "hf-rifle-tests/colors",
        "--dataset_config_name",
        "shades",
        "--model_name_or_path",
        "hf-rifle-tests/tiny-timm",
    )
    assert labels(output_dir) == SHADES_CLASSES
    assert ModelCard.load(output_dir / "README.md").data.eval_results[0].dataset_config == "shades"


@pytest.mark.parametrize("kind", ["timm", "transformers"])
def test_the_uploaded_output_folder_loads_by_name_and_predicts_as_the_local_one(
    loopback_hub, native_run, timm_imagefolder_run, tmp_path, kind
):
    hub, _ = loopback_hub
    output_dir = timm_imagefolder_run if kind == "timm" else native_run
    repo_id = f"hf-rifle-tests/rifle-{kind}"
    hub.publish("model", repo_id, output_dir)
    result = run_python(hub.env(tmp_path / "hf-home"), LOAD_BY_NAME, repo_id, str(output_dir), kind)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.split("REPORT ", 1)[1])
    assert report["pipeline_hub"] == report["pipeline_local"]
    assert {prediction["label"] for prediction in report["pipeline_hub"][0]} == set(labels(output_dir))
    assert report["auto_hub"] == report["auto_local"]
    if kind == "timm":
        assert report["timm_hub"] == report["timm_local"]
        # timm and transformers run one model (TimmWrapper adds only float rounding)
        np.testing.assert_allclose(report["timm_hub"], report["auto_hub"], rtol=1e-5, atol=1e-6)
