"""Does plain `Trainer` scale this model's loss right under gradient accumulation?

Trainer trusts a model whose forward takes `**kwargs` (or that sets `accepts_loss_kwargs`) to divide its loss by
`num_items_in_batch`, and then skips its own division by the accumulation steps. A model whose loss is a per-batch
mean ignores that count, so each update is the accumulation steps times that of one large batch. `RifleTrainer`
divides for such models; the callback, which cannot change how plain Trainer scales, warns.
"""

import inspect
import re

# transformers' loss functions sum and divide by `num_items_in_batch` when a forward passes its **kwargs on to them.
LOSS_FUNCTION_GETS_KWARGS = re.compile(r"loss_function\((?:[^()]|\([^()]*\))*\*\*kwargs")


def _base_model(model):
    """A PEFT model's base model, whose forward computes the loss; any other model itself."""
    return model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model


def trainer_skips_accumulation_division(model) -> bool:
    """Trainer's own test (`Trainer.__init__`): the model's `accepts_loss_kwargs`, else whether its forward takes
    `**kwargs`."""
    model = _base_model(model)
    if hasattr(model, "accepts_loss_kwargs"):
        return bool(model.accepts_loss_kwargs)
    parameters = inspect.signature(model.forward).parameters.values()
    return any(parameter.kind == inspect.Parameter.VAR_KEYWORD for parameter in parameters)


def loss_ignores_items_in_batch(model) -> bool:
    """Whether `model`'s loss is a per-batch mean that ignores `num_items_in_batch`.

    True for transformers' image classifiers and for a forward whose source neither names `num_items_in_batch` nor
    passes **kwargs to `self.loss_function` (BertForSequenceClassification's `CrossEntropyLoss()`, the generic
    `...ForSequenceClassification` heads); False where the loss uses it (causal LMs, Zamba2's classifier), or where
    the source cannot be read (Trainer's own judgement then stands).
    """
    model = _base_model(model)
    if getattr(model, "main_input_name", None) == "pixel_values" and getattr(model, "accepts_loss_kwargs", True):
        return True
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return False
    return "num_items_in_batch" not in source and not LOSS_FUNCTION_GETS_KWARGS.search(source)
