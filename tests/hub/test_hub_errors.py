"""A Hub dataset or model that is missing, at a revision that is missing, without the split or configuration asked
for; a Hub that refuses an upload or cannot be reached: each is one error that names the repository, the revision
and the Hub, and leaves no output folder. Real requests to a real Hub-protocol server (olah on loopback)."""

import json
from pathlib import Path

import pytest

from ..helpers import recipe_flags
from .conftest import run_python
from .server import free_port, hub_env

pytestmark = pytest.mark.multiprocess

RECIPE_WORKER = Path(__file__).with_name("recipe_worker.py")
DATA = ["--dataset_name", "hf-rifle-tests/colors"]
MODEL = ["--model_name_or_path", "hf-rifle-tests/tiny-resnet"]


def run_cases(env: dict, output_root: Path, cases: dict[str, list[str]]) -> dict[str, dict]:
    """Each case's error (type, message, traceback), from one process running the recipe on each in turn."""
    argvs = {name: recipe_flags(output_root / name, *flags) for name, flags in cases.items()}
    result = run_python(env, RECIPE_WORKER, json.dumps(argvs))
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.split("RESULTS ", 1)[1])


def assert_one_clear_error(error: dict, *named: str) -> None:
    assert error is not None, "the run should have failed"
    for text in named:
        assert text in error["message"], (text, error["message"])
    assert "httpx" not in error["traceback"], error["traceback"]  # not a traceback into the HTTP client


@pytest.mark.slow  # 26 s: one recipe process per bad case
def test_missing_repositories_revisions_splits_and_configurations(loopback_hub, tmp_path):
    hub, _ = loopback_hub
    cases = {
        "missing dataset": ["--dataset_name", "hf-rifle-tests/no-such-dataset", *MODEL],
        "missing dataset revision": [*DATA, "--dataset_revision", "no-such-branch", *MODEL],
        "missing model": [*DATA, "--model_name_or_path", "hf-rifle-tests/no-such-model"],
        "missing model revision": [*DATA, *MODEL, "--model_revision", "no-such-branch"],
        "missing split": ["--dataset_name", "hf-rifle-tests/no-train", *MODEL],
        "missing configuration": [*DATA, "--dataset_config_name", "no-such-config", *MODEL],
        "upload refused": [*DATA, *MODEL, "--push_to_hub", "--hub_model_id", "someone/rifle-run"],
    }
    errors = run_cases(hub.env(tmp_path / "hf-home"), tmp_path, cases)

    endpoint = hub.endpoint
    assert_one_clear_error(
        errors["missing dataset"], "dataset 'hf-rifle-tests/no-such-dataset' at revision 'main'", endpoint
    )
    assert_one_clear_error(
        errors["missing dataset revision"], "dataset 'hf-rifle-tests/colors' at revision 'no-such-branch'", endpoint
    )
    assert_one_clear_error(errors["missing model"], "model 'hf-rifle-tests/no-such-model' at revision 'main'", endpoint)
    assert_one_clear_error(
        errors["missing model revision"], "model 'hf-rifle-tests/tiny-resnet' at revision 'no-such-branch'", endpoint
    )
    for name in ("missing dataset", "missing dataset revision", "missing model", "missing model revision"):
        assert errors[name]["type"] == "FileNotFoundError"
        assert "--dataset_revision" in errors[name]["message"] or "--model_revision" in errors[name]["message"]
    assert_one_clear_error(
        errors["missing split"], "dataset 'hf-rifle-tests/no-train' at revision 'main'", endpoint, "no 'train' split"
    )
    assert_one_clear_error(
        errors["missing configuration"],
        "dataset 'hf-rifle-tests/colors' at revision 'main'",
        endpoint,
        "no-such-config",
    )
    # A Hub that answered stays the cause (status, request id, server message): the traceback shows it on purpose.
    refused = errors["upload refused"]
    for text in (endpoint, "refused to create someone/rifle-run", "HTTP 405", "--push_to_hub"):
        assert text in refused["message"], (text, refused["message"])
    assert refused["type"] == "PermissionError"
    *_, cause, raised = refused["traceback"].split("was the direct cause of the following exception")
    assert "HfHubHTTPError" in cause and "PermissionError" in raised
    for name in cases:
        assert not (tmp_path / name).exists(), f"{name}: the run left an output folder"


@pytest.mark.slow
def test_a_hub_that_cannot_be_reached(tmp_path):
    """Nothing listens at the endpoint (a Hub stopped before the run loads its data, or a compute node without
    network): the run ends with the endpoint, the repository and the offline way out, not a traceback into httpx.
    huggingface_hub retries a refused connection for about 20 s before giving up."""
    endpoint = f"http://127.0.0.1:{free_port()}"  # a free port: nothing listens there
    env = hub_env(endpoint, tmp_path / "hf-home")
    cases = {
        "data": [*DATA, *MODEL],
        "push": [*DATA, *MODEL, "--push_to_hub", "--hub_model_id", "someone/rifle-run"],
    }
    errors = run_cases(env, tmp_path, cases)

    assert_one_clear_error(
        errors["data"], endpoint, "could not be reached", "dataset 'hf-rifle-tests/colors'", "--prepare_only"
    )
    assert errors["data"]["type"] == "ConnectionError"
    assert_one_clear_error(errors["push"], endpoint, "could not be reached to create someone/rifle-run")
    assert "drop --push_to_hub" in errors["push"]["message"]
    for name in cases:
        assert not (tmp_path / name).exists(), f"{name}: the run left an output folder"
