"""The compute-node pattern (docs/distributed.md, "Compute nodes without network"): fetch the dataset and the model
once with `--prepare_only` where the Hub is reachable, then train with `HF_HUB_OFFLINE=1` from the cache alone.
The Hub here is olah on loopback, stopped before the offline run."""

import json

import pytest

from ..helpers import recipe_flags
from .conftest import run_recipe, started_hub
from .repos import V1_CLASSES, V1_MEAN, publish_fixture_repos
from .test_recipe_by_name import card_setting, labels

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

PINNED = [
    "--dataset_name",
    "hf-rifle-tests/colors",
    "--dataset_revision",
    "v1",
    "--model_name_or_path",
    "hf-rifle-tests/tiny-resnet",
    "--model_revision",
    "v1",
]
LATEST = ["--dataset_name", "hf-rifle-tests/colors", "--model_name_or_path", "hf-rifle-tests/tiny-resnet"]


def test_fetch_once_then_train_offline_at_the_pinned_revision(tmp_path):
    hub = started_hub(tmp_path / "hub")
    try:
        published = publish_fixture_repos(hub, tmp_path / "files")
        online = hub.env(tmp_path / "hf-home")
        # main is fetched last, so it is the version datasets' own offline fallback would take
        for flags in (PINNED, LATEST):
            fetched = run_recipe(online, *recipe_flags(tmp_path / "run", *flags, "--prepare_only"))
            assert fetched.returncode == 0, fetched.stderr[-4000:]
            assert "Fetched into the cache: dataset 'hf-rifle-tests/colors'" in fetched.stdout
            assert not (tmp_path / "run").exists(), "--prepare_only wrote the output folder"
    finally:
        hub.stop()

    offline = {**online, "HF_HUB_OFFLINE": "1"}
    trained = run_recipe(offline, *recipe_flags(tmp_path / "run", *PINNED))
    assert trained.returncode == 0, trained.stderr[-4000:]
    assert labels(tmp_path / "run") == V1_CLASSES  # not main's four classes
    assert json.loads((tmp_path / "run" / "preprocessor_config.json").read_text())["image_mean"] == V1_MEAN
    assert card_setting(tmp_path / "run", "dataset revision") == f"v1 (commit {published.colors_v1})"
    assert card_setting(tmp_path / "run", "model revision") == f"v1 (commit {published.resnet_v1})"

    never_fetched = run_recipe(
        offline, *recipe_flags(tmp_path / "other", *LATEST[:2], "--model_name_or_path", "hf-rifle-tests/tiny-timm")
    )
    assert never_fetched.returncode == 3  # data, model or Hub (README's exit codes)
    last_line = never_fetched.stderr.strip().splitlines()[-1]
    assert last_line.startswith(
        "hf-rifle-train: error: model 'hf-rifle-tests/tiny-timm' at revision 'main' is not in the local cache, and "
        "HF_HUB_OFFLINE=1 is set"
    ), last_line
    assert "Traceback" not in never_fetched.stderr
    assert "--prepare_only" in last_line
    assert not (tmp_path / "other").exists()
