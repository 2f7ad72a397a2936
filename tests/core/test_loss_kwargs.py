"""RifleTrainer divides the loss by the gradient-accumulation steps only for models whose loss ignores
`num_items_in_batch`; a text classifier whose loss uses it keeps transformers' normalization (by the items of the
whole optimizer step), as on a plain Trainer. On a plain Trainer, the callback warns where Trainer doubles the
update."""

import logging

import torch
from transformers import BertForSequenceClassification, Trainer, TrainingArguments
from transformers.loss.loss_utils import ForSequenceClassificationLoss

from hf_rifle import RifleConfig, RifleTrainer, RifleTrainerCallback
from hf_rifle.accumulation import loss_ignores_items_in_batch

from ..helpers import timm_wrapper_resnet, tiny_bert_config, tiny_run_settings, token_dataset

METHOD = dict(num_periods=2, regularizer="l2sp", l2sp_alpha=0.5, l2sp_beta=0.1)


class ItemNormalizedTextClassifier(BertForSequenceClassification):
    """A text classifier whose loss is transformers' own, summed and divided by `num_items_in_batch`."""

    def forward(self, input_ids=None, labels=None, num_items_in_batch=None, **kwargs):
        output = super().forward(input_ids=input_ids, **kwargs)
        if labels is not None:
            output.loss = ForSequenceClassificationLoss(
                labels, output.logits, self.config, num_items_in_batch=num_items_in_batch
            )
        return output


def text_classifier(cls=BertForSequenceClassification):
    """A 1-layer BERT without dropout in float64, so two runs differ only by how they scale the loss."""
    torch.manual_seed(0)
    return cls(tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).double()


def settings(output_dir, **overrides):
    return tiny_run_settings(output_dir, train_sampling_strategy="sequential", **overrides)


def test_which_models_get_the_division_by_accumulation_steps():
    assert loss_ignores_items_in_batch(timm_wrapper_resnet())  # image classifier
    assert loss_ignores_items_in_batch(text_classifier())  # BERT's CrossEntropyLoss(): a per-batch mean
    assert not loss_ignores_items_in_batch(text_classifier(ItemNormalizedTextClassifier))


class SelfDividingTextClassifier(BertForSequenceClassification):
    """A per-batch-mean loss, but the model tells Trainer so: Trainer divides by the accumulation steps itself."""

    accepts_loss_kwargs = False


def test_the_callback_on_plain_trainer_warns_where_accumulation_doubles_the_update(tmp_path, caplog):
    def warned(cls):
        trainer = Trainer(
            model=text_classifier(cls),
            args=TrainingArguments(**settings(tmp_path / cls.__name__, gradient_accumulation_steps=2, max_steps=2)),
            train_dataset=token_dataset(size=8),
            callbacks=[RifleTrainerCallback(**METHOD)],
        )
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hf_rifle"):
            trainer.train()
        return [r.getMessage() for r in caplog.records if "gradient_accumulation_steps=2" in r.getMessage()]

    (message,) = warned(BertForSequenceClassification)
    assert message.startswith("gradient_accumulation_steps=2 with BertForSequenceClassification: plain Trainer")
    assert "Use RifleTrainer, which divides, or divide the learning rate by 2." in message
    assert warned(ItemNormalizedTextClassifier) == [] and warned(SelfDividingTextClassifier) == []


def test_a_text_classifier_whose_loss_takes_the_item_count_keeps_transformers_normalization(tmp_path):
    # 14 sequences, batch 4, accumulation 2: the second optimizer step has micro-batches of 4 and 2 items, which
    # transformers sums and divides by 6, where averaging each and dividing by the micro-batches weighs items apart.
    run = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2)
    plain_model = text_classifier(ItemNormalizedTextClassifier)
    plain = Trainer(
        model=plain_model,
        args=TrainingArguments(**settings(tmp_path / "plain", **run)),
        train_dataset=token_dataset(size=14),
        callbacks=[RifleTrainerCallback(**METHOD)],
    )
    plain.train()
    rifle_model = text_classifier(ItemNormalizedTextClassifier)
    rifle = RifleTrainer(
        model=rifle_model,
        args=RifleConfig(**settings(tmp_path / "rifle", **run), **METHOD),
        train_dataset=token_dataset(size=14),
    )
    assert rifle.model_accepts_loss_kwargs and plain.model_accepts_loss_kwargs
    rifle.train()
    for (name, a), b in zip(plain_model.state_dict().items(), rifle_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8, msg=name)


def test_a_text_classifier_whose_loss_is_a_batch_mean_gets_the_same_update_with_accumulation(tmp_path):
    def trained(batch_size, accumulation):
        model = text_classifier()
        args = RifleConfig(
            **settings(
                tmp_path / f"{batch_size}x{accumulation}",
                per_device_train_batch_size=batch_size,
                gradient_accumulation_steps=accumulation,
                max_steps=1,
            ),
            **{**METHOD, "num_periods": 1},
        )
        trainer = RifleTrainer(model=model, args=args, train_dataset=token_dataset(size=8))
        assert not trainer.model_accepts_loss_kwargs  # it would get twice the gradient otherwise
        trainer.train()
        return model.state_dict()

    whole, accumulated = trained(8, 1), trained(4, 2)
    for name, value in whole.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-8, atol=1e-8, msg=name)
