"""The model card follows the model's task (a text classifier's card is found under text-classification on the Hub),
and writing it changes nothing process-wide (a notebook's plotting backend stays the one it chose)."""

import matplotlib
import pytest
from huggingface_hub import ModelCard
from torch import nn

from hf_rifle import RifleConfig, RifleTrainer
from hf_rifle.card import IMAGE_CLASSIFICATION, classification_task, plot_learning_curve, render_model_card

from ..helpers import (
    TinyClassifier,
    native_resnet,
    timm_wrapper_resnet,
    tiny_run_settings,
    tiny_text_classifier,
    token_dataset,
)

LOG_HISTORY = [
    {"step": 1, "loss": 1.2, "learning_rate": 0.01, "head_learning_rate": 0.01},
    {"step": 2, "loss": 0.9, "learning_rate": 0.008, "head_learning_rate": 0.005},
    {"step": 2, "eval_accuracy": 0.5, "eval_top5_accuracy": 1.0},
    {"step": 3, "loss": 0.7, "learning_rate": 0.004, "head_learning_rate": 0.01},
    {"step": 3, "test_accuracy": 0.75},
]


def card_for(model, tmp_path) -> ModelCard:
    """The card of a finished 3-step run of `model`, saved and read back as the Hub parses it."""
    card = render_model_card(
        RifleConfig(**tiny_run_settings(tmp_path / "run", max_steps=3)),
        LOG_HISTORY,
        3,
        [2],
        repo_id="someone/rifle-run",
        dataset="someone/data",
        task=classification_task(model),
    )
    card.save(tmp_path / "README.md")
    return ModelCard.load(tmp_path / "README.md")


def test_a_text_classifiers_card_carries_text_classification_metadata(tmp_path):
    card = card_for(tiny_text_classifier(), tmp_path)

    assert card.data.pipeline_tag == "text-classification"
    assert "text-classification" in card.data.tags and "image-classification" not in card.data.tags
    assert {result.task_type for result in card.data.eval_results} == {"text-classification"}
    assert 'pipeline("text-classification", model="someone/rifle-run")' in card.text
    assert "image" not in card.text.split("## How to use")[1].split("## Citation")[0]


@pytest.mark.parametrize(
    "model",
    [native_resnet, timm_wrapper_resnet, TinyClassifier],
    ids=["transformers ResNet", "timm through transformers", "plain nn.Module"],
)
def test_an_image_classifiers_card_keeps_image_classification_metadata(model, tmp_path):
    card = card_for(model(), tmp_path)

    assert card.data.pipeline_tag == "image-classification"
    assert "image-classification" in card.data.tags
    assert {result.task_type for result in card.data.eval_results} == {"image-classification"}
    assert 'pipeline("image-classification", model="someone/rifle-run")' in card.text


def test_the_task_is_read_through_wrappers_and_from_the_main_input_of_custom_classes():
    class CustomTextModel(nn.Module):
        main_input_name = "input_ids"

    class Wrapper(nn.Module):  # as DDP holds the model: in `module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert classification_task(CustomTextModel()) == "text-classification"
    assert classification_task(Wrapper(tiny_text_classifier())) == "text-classification"
    assert classification_task(Wrapper(native_resnet())) == IMAGE_CLASSIFICATION


def test_an_unknown_task_is_refused_naming_the_way_to_get_one(tmp_path):
    with pytest.raises(ValueError, match="classification_task"):
        render_model_card(
            RifleConfig(**tiny_run_settings(tmp_path)), LOG_HISTORY, 3, [], repo_id="a/b", task="object-detection"
        )


@pytest.fixture
def svg_backend():
    """A caller's own backend choice (as a notebook makes with %matplotlib), given back as found after the test."""
    found = matplotlib.get_backend()
    matplotlib.use("svg")
    yield
    matplotlib.use(found)


def test_writing_the_card_plot_leaves_the_callers_backend_set(svg_backend, tmp_path):
    import matplotlib.pyplot as plt

    open_figures = plt.get_fignums()
    path = plot_learning_curve(LOG_HISTORY, [2], tmp_path / "curve.png")

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == "svg"
    assert plt.get_fignums() == open_figures  # the card's figure never joined pyplot's


def test_rifle_trainers_card_of_a_text_classifier_is_filed_under_text_classification(tmp_path):
    trainer = RifleTrainer(
        model=tiny_text_classifier(),
        args=RifleConfig(**tiny_run_settings(tmp_path, max_steps=3)),
        train_dataset=token_dataset(),
    )
    trainer.train()
    trainer.create_model_card()
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.pipeline_tag == "text-classification" and "image-classification" not in card.data.tags
