import numpy as np
import pytest
from transformers import EvalPrediction

from hf_rifle.recipe.metrics import compute_classification_metrics, top_k_accuracy


def random_predictions(num_rows, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(num_rows, num_classes)), rng.integers(0, num_classes, size=num_rows)


def direct_top_k_accuracy(logits, labels, k):
    ranked = np.argsort(-logits, axis=1)[:, :k]
    return np.mean([label in row for row, label in zip(ranked, labels)])


def test_metrics_match_direct_computation():
    logits, labels = random_predictions(200, 10)
    metrics = compute_classification_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    assert metrics["accuracy"] == pytest.approx(np.mean(logits.argmax(axis=1) == labels))
    assert metrics["top5_accuracy"] == pytest.approx(direct_top_k_accuracy(logits, labels, 5))
    assert 0 < metrics["accuracy"] < metrics["top5_accuracy"] < 1


def test_top5_is_omitted_with_fewer_than_five_classes():
    logits, labels = random_predictions(50, 4)
    metrics = compute_classification_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    assert set(metrics) == {"accuracy"}


def test_tuple_predictions_use_the_first_element():
    logits, labels = random_predictions(30, 6)
    hidden_states = np.zeros((30, 3, 7))
    metrics = compute_classification_metrics(EvalPrediction(predictions=(logits, hidden_states), label_ids=labels))
    assert metrics["accuracy"] == pytest.approx(np.mean(logits.argmax(axis=1) == labels))


def test_top_k_accuracy_on_a_hand_made_case():
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    labels = np.array([1, 1, 0])
    assert top_k_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert top_k_accuracy(logits, labels, 3) == 1.0
