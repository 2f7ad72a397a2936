"""README's Hub training command, read from README at test time and run as written against the loopback Hub, which
serves stand-ins under the real ids: `ethz/food101` (four of its classes, a few images each) and
`timm/resnet50.a1_in1k` (the real architecture in timm's Hub format, random weights). Flags appended after the
command (the tests' `recipe_flags`) give it a temporary output folder and shrink the run (argparse keeps a flag's
last value)."""

import json
import re
import shlex
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from ..helpers import recipe_flags
from .conftest import run_recipe
from .repos import write_parquet_dataset

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

README = Path(__file__).parents[2] / "README.md"
COMMAND_START = "hf-rifle-train --model_name_or_path"
FOOD101_CLASSES = ["apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio"]  # Food-101's first four


def readme_hub_command() -> list[str]:
    """The first command of README's "The training recipe" that starts with `COMMAND_START`, as argv."""
    section = README.read_text().split("\n## The training recipe\n", 1)[1].split("\n## ", 1)[0]
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL):
        for command in block.replace("\\\n", " ").splitlines():
            if command.startswith(COMMAND_START):
                return shlex.split(command, comments=True)
    raise AssertionError(f"README's 'The training recipe' has no ```bash command starting with {COMMAND_START!r}")


def write_resnet50_a1(folder: Path) -> Path:
    """`timm/resnet50.a1_in1k` as timm uploads it, with random weights (a ~100 MB safetensors file)."""
    import timm
    import torch
    from timm.models import save_for_hf

    torch.manual_seed(0)
    save_for_hf(timm.create_model("resnet50.a1_in1k", pretrained=False), folder, safe_serialization=True)
    return folder


def test_readmes_hub_command_trains_by_name_and_the_card_records_both_revisions(loopback_hub, tmp_path):
    hub, _ = loopback_hub
    argv = readme_hub_command()
    assert "--push_to_hub" not in argv, "README's training command must not push: this test runs it as written"
    food101 = hub.publish(
        "dataset", "ethz/food101", write_parquet_dataset(tmp_path / "food101", {"default": FOOD101_CLASSES})
    )
    resnet50 = hub.publish("model", "timm/resnet50.a1_in1k", write_resnet50_a1(tmp_path / "resnet50"))
    output_dir = tmp_path / "run"

    # 4 classes x 2 images in batches of 4, one epoch: 2 optimizer steps, one per period
    small_run = recipe_flags(output_dir, "--samples_per_class", "2", "--num_train_epochs", "1")
    result = run_recipe(hub.env(tmp_path / "hf-home"), *argv[1:], *small_run)

    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((output_dir / "config.json").read_text())["label_names"] == FOOD101_CLASSES
    card = ModelCard.load(output_dir / "README.md")
    assert card.data.base_model == "timm/resnet50.a1_in1k"
    assert card.data.datasets == ["ethz/food101"]
    assert f"| dataset revision | main (commit {food101}) |" in card.text
    assert f"| model revision | main (commit {resnet50}) |" in card.text
