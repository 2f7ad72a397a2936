"""Where a model's residual stages are: the layers the CNN-dropout baseline drops and the diagnostics probe."""

from torch import nn


def residual_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(dotted name, module) of the residual stages of a ResNet-like model, input side first.

    timm and torchvision ResNets: `layer1..layer4` (under `timm_model.` in transformers'
    `TimmWrapperForImageClassification`); transformers' native ResNet and other models with a `stages`
    container (timm ConvNeXt, ...): `stages[i]` (`resnet.encoder.stages.i`); timm EfficientNets (the offline
    demo's model): each stage `blocks[i]`, a Sequential of inverted-residual blocks.
    """
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(getattr(module, "layer1", None), nn.Module):
            stages = []
            while isinstance(getattr(module, f"layer{len(stages) + 1}", None), nn.Module):
                stages.append((f"{prefix}layer{len(stages) + 1}", getattr(module, f"layer{len(stages) + 1}")))
            return stages
        container = getattr(module, "stages", None)
        if isinstance(container, (nn.ModuleList, nn.Sequential)) and len(container) > 0:
            return [(f"{prefix}stages.{i}", stage) for i, stage in enumerate(container)]
        blocks = getattr(module, "blocks", None)  # a ViT's blocks are single blocks, an EfficientNet's are stages
        if isinstance(blocks, nn.Sequential) and len(blocks) > 0 and all(isinstance(b, nn.Sequential) for b in blocks):
            return [(f"{prefix}blocks.{i}", stage) for i, stage in enumerate(blocks)]
    raise ValueError(
        f"No residual stages found in {type(model).__name__}: it has neither ResNet's layer1..layer4, a "
        "`stages` container nor EfficientNet's staged `blocks`. Name the stage modules explicitly "
        "(stages=[...] / layers=[...], dotted names from model.named_modules())."
    )
