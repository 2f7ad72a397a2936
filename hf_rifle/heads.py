"""Find a classifier's head, re-draw it in place, and clear its optimizer state.

Discovery is one ordered list of conventions (explicit name, timm's `get_classifier()`, the transformers
attribute names); re-initialization keeps the same Parameter objects so the optimizer, DDP and
torch.compile, which all hold references to them, keep working.
"""

import copy

import torch
from torch import nn

HEAD_ATTRIBUTES = ("classifier", "fc", "head")


def find_head(model: nn.Module, head_module: str | None = None) -> tuple[str, nn.Module]:
    """Return (dotted name, module) of the classification head.

    Tried in order: `head_module` if given; timm's `get_classifier()` on the model or on a submodule (as in
    transformers' `TimmWrapperForImageClassification.timm_model`); the attributes `classifier`, `fc`,
    `head` of the model, `Sequential` heads included (native `ResNetForImageClassification.classifier` is
    Flatten + Linear). A head that PEFT keeps in `modules_to_save` is the trainable copy of the active adapter,
    never the frozen original beside it.
    """
    if head_module:
        return _trainable_copy(head_module, _named_head(model, head_module))
    for module in model.modules():
        if callable(getattr(module, "get_classifier", None)):
            head = module.get_classifier()
            if _has_parameters(head):
                return _trainable_copy(_name_of(model, head), head)
    for attribute in HEAD_ATTRIBUTES:
        head = getattr(model, attribute, None)
        if _has_parameters(head):
            return _trainable_copy(attribute, head)
    linear_layers = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    raise ValueError(
        f"No classification head found on {type(model).__name__}: it has no timm get_classifier() and no "
        f"{'/'.join(HEAD_ATTRIBUTES)} attribute with parameters. Linear layers in the model: "
        f"{', '.join(linear_layers) or 'none'}. Name the head with head_module='<dotted name>' "
        "(--head_module on the command line)."
    )


def _trainable_copy(name: str, head: nn.Module) -> tuple[str, nn.Module]:
    """PEFT's `ModulesToSaveWrapper` holds the frozen original and a trainable copy per adapter: the copy is the head.

    Recognized by its attributes, so peft need not be installed.
    """
    copies = getattr(head, "modules_to_save", None)
    if isinstance(copies, nn.ModuleDict) and isinstance(getattr(head, "original_module", None), nn.Module):
        adapter = head.active_adapters[0]
        return f"{name}.modules_to_save.{adapter}", copies[adapter]
    return name, head


def _named_head(model: nn.Module, name: str) -> nn.Module:
    try:
        head = model.get_submodule(name)
    except AttributeError:
        children = ", ".join(child for child, _ in model.named_children())
        raise ValueError(
            f"head_module={name!r} does not exist in {type(model).__name__}; its top-level modules are: "
            f"{children}. Pass the dotted name of the classifier layer (e.g. 'fc' or 'classifier.1')."
        ) from None
    if not _has_parameters(head):
        raise ValueError(
            f"head_module={name!r} has no trainable parameters, so there is nothing to re-initialize. "
            "Point it at the Linear classifier layer (or the Sequential that contains it)."
        )
    return head


def _has_parameters(module) -> bool:
    return isinstance(module, nn.Module) and any(p.requires_grad for p in module.parameters())


def _name_of(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def head_seed(seed: int, period: int) -> int:
    """Seed for the head drawn at `period`: a function of the run's seed only, so every rank and every
    resumed run draws the same head, and runs that differ only in method share their heads."""
    return (seed * 1_000_003 + period) % 2**63


@torch.no_grad()
def reinit_head_(head: nn.Module, seed: int, init: str = "default", std: float = 0.01) -> None:
    """Re-draw the head's parameters (and buffers) in place from a generator seeded with `seed`.

    `init="default"` runs each module's own `reset_parameters()`, as the authors' code does;
    `init="normal"` draws Linear weights from N(0, std^2) with zero bias, as in Algorithm 1. Values are drawn
    on the CPU in float32 from torch's CPU generator, forked so the global random stream is untouched, then
    copied in: the draw is the same on every device and the Parameter objects stay the same.
    """
    fresh = copy.deepcopy(head).to("cpu").float()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        for module in fresh.modules():
            if init == "normal" and isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
    head.load_state_dict(fresh.state_dict())


def clear_optimizer_state_(optimizer: torch.optim.Optimizer, params) -> None:
    """Forget momentum buffers, Adam moments and step counts of `params`, so a re-drawn head starts fresh.

    Fused SGD cannot start the buffers of some parameters of a param group while others have theirs, so there a
    buffer is zeroed instead: the same next update (the gradient itself) when dampening is 0, SGD's default.
    """
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    for param in params:
        state = optimizer.state.pop(param, None)
        group = group_of.get(id(param), {})
        if state and "momentum_buffer" in state and group.get("fused") and not group.get("dampening"):
            optimizer.state[param] = {"momentum_buffer": state["momentum_buffer"].zero_()}
