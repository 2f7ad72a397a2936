"""Load, wrap and save image classifiers so that timm and transformers both read what we write.

Every model the recipe trains is a `transformers` image classifier: either a native one
(`ResNetForImageClassification`, ...) or a `TimmWrapperForImageClassification` around a
timm model. Keeping a single model type means one Trainer code path for Hub timm checkpoints,
transformers checkpoints, local folders, bare weight files and the offline demo model.

Three traps shape this module:

* A classifier head only gets the new label names when `num_labels`, `id2label`,
  `label2id` and `ignore_mismatched_sizes` are passed together; `id2label` alone is
  silently ignored by timm configs.
* timm's `save_for_hf` / `push_to_hf_hub` write `model_args.num_classes` into
  `config.json`; `TimmWrapper` passes `num_classes` again and fails with "got multiple
  values for keyword argument 'num_classes'". We drop it when loading and never write it.
* `save_pretrained` keeps the 'timm_model.' key prefix for a TimmWrapper that was not loaded
  with `from_pretrained`, and timm cannot load that. So every TimmWrapper here comes from
  `from_pretrained` of a Hub-style folder, and `save_image_classifier` writes timm's key names.

Weight files are only ever read with `safetensors` or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory

import timm
import torch
from PIL import Image
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save_file as save_safetensors_file
from timm.data import resolve_data_config
from timm.models import filter_pretrained_cfg
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    PreTrainedModel,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    TimmWrapperImageProcessor,
    modeling_utils,
)

from ..heads import find_head
from ..hub import is_hub_id
from .sources import HubSource, hub_errors_explained

PICKLE_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
NESTED_STATE_DICT_KEYS = ("state_dict", "model")
STRIPPED_KEY_PREFIXES = ("timm_model.", "module.")
# Keys TimmWrapperConfig keeps but whose values describe the checkpoint's old head.
STALE_HEAD_CONFIG_KEYS = ("label_names", "label_descriptions")
LOAD_REPORT_MARK = "LOAD REPORT"  # in the first line of transformers' report of missing, unexpected, resized weights

logger = logging.getLogger(__name__)


# --- loading -------------------------------------------------------------------------------


def load_image_classifier(
    model_name_or_path: str,
    *,
    num_labels: int,
    id2label: dict[int, str],
    label2id: dict[str, int],
    ignore_mismatched_sizes: bool = True,
    trust_remote_code: bool = False,
    revision: str | None = None,
    cache_dir=None,
    token=None,
) -> PreTrainedModel:
    """Load a pretrained classifier (Hub id or local folder, timm or transformers format) with a head for our labels.

    A checkpoint head of a different size is re-initialized (`ignore_mismatched_sizes`); one
    of the same size is kept, as when resuming from a checkpoint fine-tuned on the same labels.
    Replacing the head is the point of loading a classifier for new labels, so it is said in one line of our
    own; transformers' load report, which lists it as a MISMATCH, is shown only when it reports anything else.
    """
    id2label, label2id = validated_labels(num_labels, id2label, label2id)
    if Path(model_name_or_path).is_file():
        raise ValueError(
            f"{model_name_or_path!r} is a weights file, which does not say which architecture it holds; "
            "use load_timm_weights_file(architecture, weights_path, ...) instead."
        )
    hub_kwargs = dict(revision=revision, cache_dir=cache_dir, token=token, trust_remote_code=trust_remote_code)
    config = with_new_labels(load_config(model_name_or_path, **hub_kwargs), id2label, label2id)
    source = model_source(model_name_or_path, revision)
    with held_log_records(modeling_utils.logger) as held, hub_errors_explained(source):
        model, loading_info = AutoModelForImageClassification.from_pretrained(
            model_name_or_path,
            config=config,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            output_loading_info=True,
            **hub_kwargs,
        )
    replaced = replaced_head(model, loading_info)
    for record in held:
        if not (replaced and LOAD_REPORT_MARK in record.getMessage()):
            modeling_utils.logger.handle(record)
    if replaced:
        logger.info(replaced)  # the point of loading a classifier for new labels: nothing to act on
    return model


@contextmanager
def held_log_records(held_logger: logging.Logger) -> Iterator[list[logging.LogRecord]]:
    """Keep the records `held_logger` emits inside the block from its handlers, in a list, to be passed on or not."""
    held = []

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    held_logger.addFilter(hold)
    try:
        yield held
    finally:
        held_logger.removeFilter(hold)


def replaced_head(model: PreTrainedModel, loading_info: dict) -> str | None:
    """The line that says the checkpoint's head was replaced by one for our labels, when that is all the load
    report holds (nothing missing or unexpected, and only the head's weights of another size); otherwise None."""
    mismatched = loading_info["mismatched_keys"]
    if not mismatched or loading_info["missing_keys"] or loading_info["unexpected_keys"]:
        return None
    head_name, _ = find_head(model)
    if not all(key.startswith(f"{head_name}.") for key, _, _ in mismatched):
        return None
    old_classes = sorted({checkpoint_shape[0] for _, checkpoint_shape, _ in mismatched})
    return (
        f"Replaced the pretrained {'/'.join(map(str, old_classes))}-class head ({head_name}) by a new "
        f"{model.config.num_labels}-class head for this dataset's labels, as intended for fine-tuning on new labels."
    )


def validated_labels(
    num_labels: int, id2label: dict[int, str], label2id: dict[str, int]
) -> tuple[dict[int, str], dict[str, int]]:
    """Return the label maps with int ids, or raise: a mismatch would silently mislabel predictions."""
    id2label = {int(i): name for i, name in id2label.items()}
    if sorted(id2label) != list(range(num_labels)):
        raise ValueError(f"id2label must have exactly the ids 0..{num_labels - 1}, got {sorted(id2label)}.")
    if label2id != {name: i for i, name in id2label.items()}:
        raise ValueError("label2id must be the inverse of id2label (and label names must be unique).")
    return id2label, dict(label2id)


def load_config(model_name_or_path: str, **kwargs):
    """`AutoConfig.from_pretrained` with an error that says where we looked and what to check."""
    source = model_source(model_name_or_path, kwargs.get("revision"))
    with hub_errors_explained(source):
        try:
            return AutoConfig.from_pretrained(model_name_or_path, **kwargs)
        except OSError as error:
            if Path(model_name_or_path).is_dir():
                raise OSError(
                    f"Local folder {model_name_or_path!r} has no readable config.json; expected a Hub-style folder "
                    "(config.json + model.safetensors) as written by save_image_classifier, save_pretrained "
                    "or timm's save_for_hf."
                ) from error
            if source is None:
                raise OSError(
                    f"{model_name_or_path!r} is neither a local folder or file nor a Hub repository id "
                    "(namespace/name); check the path."
                ) from error
            raise


def model_source(model_name_or_path: str, revision: str | None) -> HubSource | None:
    """The Hub model a run names, or None for a local folder or file."""
    if not is_hub_id(model_name_or_path):
        return None
    return HubSource("model", model_name_or_path, revision, "--model_name_or_path", "--model_revision")


def with_new_labels(config, id2label: dict[int, str], label2id: dict[str, int]):
    """A copy of a checkpoint config describing our head; `num_labels` follows from `id2label`.

    Setting the labels on the loaded config (instead of passing them to `from_pretrained`)
    avoids a misleading "incompatible num_labels" warning. For timm configs it also drops
    `model_args.num_classes` (passed twice by TimmWrapper) and the old head's `label_names`
    and `label_descriptions`, which would otherwise be saved and override our labels, and
    makes `model_args` a dict: `save_pretrained` writes `"model_args": null` for None,
    on which timm's config loader crashes.
    """
    config = copy.deepcopy(config)
    config.id2label, config.label2id = id2label, label2id
    if isinstance(config, TimmWrapperConfig):
        config.model_args = {k: v for k, v in (config.model_args or {}).items() if k != "num_classes"}
        for key in STALE_HEAD_CONFIG_KEYS:
            if hasattr(config, key):
                delattr(config, key)
    return config


def load_timm_weights_file(
    architecture: str,
    weights_path,
    *,
    num_labels: int,
    id2label: dict[int, str],
    label2id: dict[str, int],
) -> PreTrainedModel:
    """Load a bare weights file for a timm architecture as a TimmWrapper classifier with a head for our labels.

    The file is written as a Hub-style timm folder and loaded by `load_image_classifier`, so it
    takes the same code path as a Hub checkpoint (and later saves the same way). The file's
    classifier is re-initialized when its class count differs.
    """
    state_dict = strip_key_prefixes(load_weights_file(weights_path))
    check_weights_fit_architecture(architecture, state_dict)
    config = timm_wrapper_config(architecture, num_labels=num_labels, id2label=id2label, label2id=label2id)
    with TemporaryDirectory() as folder:
        write_timm_checkpoint(folder, state_dict, config)
        return load_image_classifier(folder, num_labels=num_labels, id2label=id2label, label2id=label2id)


def timm_wrapper_config(
    architecture: str,
    *,
    num_labels: int,
    id2label: dict[int, str],
    label2id: dict[str, int],
    pretrained_cfg: dict | None = None,
) -> TimmWrapperConfig:
    """A TimmWrapper config that carries timm's preprocessing (`pretrained_cfg`), so saves load in timm too."""
    if not timm.is_model(architecture):
        raise ValueError(f"{architecture!r} is not a timm architecture; see timm.list_models().")
    id2label, label2id = validated_labels(num_labels, id2label, label2id)
    pretrained_cfg = pretrained_cfg or timm.models.get_pretrained_cfg(architecture).to_dict()
    return TimmWrapperConfig(
        architecture=architecture,
        num_labels=num_labels,
        id2label=id2label,
        label2id=label2id,
        pretrained_cfg=exportable_pretrained_cfg(pretrained_cfg),
    )


def exportable_pretrained_cfg(pretrained_cfg: dict) -> dict:
    """Timm's preprocessing config without download sources and head facts, which config.json keeps at its root."""
    head_keys = {"architecture", "num_classes", *STALE_HEAD_CONFIG_KEYS}
    filtered = filter_pretrained_cfg(pretrained_cfg, remove_source=True, remove_null=True)
    return {k: v for k, v in filtered.items() if k not in head_keys and k != "state_dict"}


def load_weights_file(weights_path) -> dict[str, torch.Tensor]:
    """Read a state dict without executing pickled code: safetensors, or `torch.load(weights_only=True)`."""
    path = Path(weights_path)
    if path.suffix == SAFETENSORS_SUFFIX:
        return load_safetensors_file(path, device="cpu")
    if path.suffix not in PICKLE_WEIGHT_SUFFIXES:
        raise ValueError(
            f"Unsupported weights file {path.name!r}: expected {SAFETENSORS_SUFFIX} or one of {PICKLE_WEIGHT_SUFFIXES}."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"Refusing to load {path.name!r}: it pickles objects other than tensors, and unpickling them could "
            "run arbitrary code. Re-save only the state dict (torch.save(model.state_dict(), ...)) or convert it "
            "to .safetensors."
        ) from error
    return tensors_only(unwrap_checkpoint(checkpoint), path.name)


def unwrap_checkpoint(checkpoint: dict) -> dict:
    """Training checkpoints often nest the weights under 'state_dict' or 'model'."""
    for key in NESTED_STATE_DICT_KEYS:
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def tensors_only(state_dict: dict, source_name: str) -> dict[str, torch.Tensor]:
    """Raise unless every value is a tensor, so non-weights never reach `load_state_dict`."""
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{source_name!r} is not a plain state dict; non-tensor entries: {not_tensors[:5]}.")
    return state_dict


def strip_key_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept weights saved from a TimmWrapper ('timm_model.') or DistributedDataParallel ('module.')."""

    def strip(key: str) -> str:
        for prefix in STRIPPED_KEY_PREFIXES:
            key = key.removeprefix(prefix)
        return key

    return {strip(k): v for k, v in state_dict.items()}


def check_weights_fit_architecture(architecture: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise unless the weights fit the architecture, classifier size aside.

    transformers only logs missing or unexpected keys, which would silently train a random backbone.
    """
    timm_model = timm.create_model(architecture, pretrained=False)
    expected = timm_model.state_dict()
    head_keys = classifier_state_keys(timm_model)
    wrong_shapes = [
        k for k, v in state_dict.items() if k in expected and k not in head_keys and v.shape != expected[k].shape
    ]
    missing = sorted(set(expected) - set(state_dict) - head_keys)
    unexpected = sorted(set(state_dict) - set(expected))
    if wrong_shapes or missing or unexpected:
        raise ValueError(
            f"Weights do not fit timm architecture {architecture!r}: wrong shapes {wrong_shapes[:5]}, "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}. Is the file for another architecture?"
        )


def classifier_state_keys(timm_model: torch.nn.Module) -> set[str]:
    """State-dict keys of the module timm reports as the classifier (e.g. 'fc.weight', 'head.fc.bias')."""
    classifier = timm_model.get_classifier()
    name = next(n for n, module in timm_model.named_modules() if module is classifier)
    return {f"{name}.{key}" for key in classifier.state_dict()}


# --- saving --------------------------------------------------------------------------------


def save_image_classifier(model: PreTrainedModel, output_dir, image_processor=None) -> Path:
    """Save so that transformers (`from_pretrained`, `pipeline`) and, for timm models, timm load it.

    A saved TimmWrapper folder loads with `timm.create_model("local-dir:<dir>", pretrained=True)`
    and, once uploaded, with `"hf-hub:<repo>"`.

    Native transformers models use `save_pretrained`. TimmWrapper models are written like a Hub
    timm repo by `write_timm_checkpoint`: `save_pretrained` (and so `Trainer.save_model`)
    keeps the 'timm_model.' key prefix for wrappers not created by `from_pretrained`, which
    timm cannot load.
    """
    output_dir = Path(output_dir)
    if isinstance(model, TimmWrapperForImageClassification):
        write_timm_checkpoint(output_dir, model.timm_model.state_dict(), model.config)
    else:
        model.save_pretrained(output_dir)
    if image_processor is not None:
        image_processor.save_pretrained(output_dir)
    return output_dir


def write_timm_checkpoint(output_dir, timm_state_dict: dict[str, torch.Tensor], config: TimmWrapperConfig) -> Path:
    """Write config.json + model.safetensors as a Hub timm repo has them.

    Weights keep timm's own key names; the config has the keys both libraries read.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in timm_state_dict.items()}
    save_safetensors_file(tensors, output_dir / "model.safetensors", metadata={"format": "pt"})
    (output_dir / "config.json").write_text(json.dumps(timm_readable_config(config), indent=2) + "\n")
    return output_dir


def timm_readable_config(config: TimmWrapperConfig) -> dict:
    """TimmWrapperConfig as JSON that timm's config loader also reads.

    timm needs `architecture`, `num_classes` and `pretrained_cfg` at the root, takes label
    names from `label_names` and passes `model_args` to `create_model`; transformers needs
    `model_type` and reads `label_names` back into `id2label`. `model_args.num_classes`
    would break TimmWrapper, and stale `label_descriptions` would mislabel classes.
    """
    label_names = [config.id2label[i] for i in range(config.num_labels)]
    saved = json.loads(config.to_json_string())
    model_args = {k: v for k, v in (saved.get("model_args") or {}).items() if k != "num_classes"}
    pretrained_cfg = saved.get("pretrained_cfg") or timm.models.get_pretrained_cfg(config.architecture).to_dict()
    saved.update(
        architectures=[TimmWrapperForImageClassification.__name__],
        num_classes=config.num_labels,
        label_names=label_names,
        model_args=model_args or None,
        pretrained_cfg=exportable_pretrained_cfg(pretrained_cfg),
    )
    if set(saved.get("label_descriptions") or {}) != set(label_names):
        saved.pop("label_descriptions", None)
    return {k: v for k, v in saved.items() if v is not None}


# --- preprocessing -------------------------------------------------------------------------


def image_processor_for(model: PreTrainedModel, resize_size: int, crop_size: int, **hub_kwargs):
    """The image processor saved beside the model, so `pipeline("image-classification")` evaluates like training.

    For timm models the checkpoint's `pretrained_cfg` is set to the recipe's eval transform (resize the
    shorter side to `resize_size`, center-crop `crop_size`), which timm's `resolve_data_config` also reads.
    Native transformers models keep their own processor from `model.name_or_path`.
    """
    if isinstance(model, TimmWrapperForImageClassification):
        model.config.pretrained_cfg = {
            **(model.config.pretrained_cfg or {}),
            "input_size": [3, crop_size, crop_size],
            "crop_pct": crop_size / resize_size,
            "crop_mode": "center",
            "interpolation": "bilinear",
        }
        return TimmWrapperImageProcessor(
            pretrained_cfg=model.config.pretrained_cfg, architecture=model.config.architecture
        )
    with hub_errors_explained(model_source(model.name_or_path, hub_kwargs.get("revision"))):
        return AutoImageProcessor.from_pretrained(model.name_or_path, **hub_kwargs)


def image_processing_config(model: PreTrainedModel, image_processor=None) -> dict:
    """Preprocessing in timm's data-config format (input_size, interpolation, mean, std, crop_pct, crop_mode).

    One format for both model kinds, ready for `timm.data.create_transform`. TimmWrapper models
    use the checkpoint's `pretrained_cfg` (what `TimmWrapperImageProcessor` uses too), not the
    architecture default, which can differ per pretrained tag. Native models are described from
    their image processor, loaded from `model.name_or_path` unless given.
    """
    if isinstance(model, TimmWrapperForImageClassification):
        pretrained_cfg = getattr(model.config, "pretrained_cfg", None) or model.timm_model.pretrained_cfg
        data_config = resolve_data_config({}, pretrained_cfg=dict(pretrained_cfg))
        return {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()}
    processor = image_processor or AutoImageProcessor.from_pretrained(model.name_or_path)
    return timm_data_config_from_processor(processor)


def timm_data_config_from_processor(processor) -> dict:
    """Translate a transformers image processor's resize/crop/normalize settings into timm terms."""
    settings = processor.to_dict()
    size = settings.get("size") or {}
    crop_size = settings.get("crop_size") or {}
    if settings.get("do_center_crop") and crop_size:
        resized_edge = size.get("shortest_edge") or size["height"]
        spatial, crop_pct = (crop_size["height"], crop_size["width"]), crop_size["height"] / resized_edge
        crop_mode = "center"
    elif size.get("shortest_edge") and settings.get("crop_pct"):
        # ConvNext-style: resize to edge/crop_pct and center-crop below 384 px, plain resize from 384 px.
        edge = size["shortest_edge"]
        spatial, crop_pct, crop_mode = (edge, edge), (settings["crop_pct"] if edge < 384 else 1.0), "center"
    elif size.get("height") and size.get("width"):
        spatial, crop_pct, crop_mode = (size["height"], size["width"]), 1.0, "squash"
    else:
        raise ValueError(
            f"Cannot express the resize settings {size} of {type(processor).__name__} in timm terms; "
            "use the image processor itself for preprocessing."
        )
    return {
        "input_size": (3, *spatial),
        "interpolation": Image.Resampling(settings["resample"]).name.lower(),
        "mean": tuple(settings["image_mean"]),
        "std": tuple(settings["image_std"]),
        "crop_pct": crop_pct,
        "crop_mode": crop_mode,
    }
