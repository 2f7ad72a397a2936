"""The Hub tests' server: olah on loopback for the whole session, over the repositories of `repos.py`."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .repos import publish_fixture_repos
from .server import LoopbackHub

HF_RIFLE_TRAIN = Path(sys.executable).with_name("hf-rifle-train")


@pytest.fixture(scope="session")
def loopback_hub(tmp_path_factory):
    """A started `LoopbackHub` with the fixture's repositories published, and their pinned commits."""
    hub = started_hub(tmp_path_factory.mktemp("hub"))
    try:
        published = publish_fixture_repos(hub, tmp_path_factory.mktemp("hub-files"))
        yield hub, published
    finally:
        hub.stop()


def started_hub(root: Path) -> LoopbackHub:
    if shutil.which("git") is None:
        pytest.skip("the loopback Hub (olah) serves git repositories and needs the `git` binary, which is missing")
    hub = LoopbackHub(root)
    hub.start()
    return hub


def run_recipe(env: dict, *argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`hf-rifle-train ARGV` as a user runs it, in a process of its own with `env`."""
    return subprocess.run([str(HF_RIFLE_TRAIN), *argv], env=env, capture_output=True, text=True, timeout=timeout)


def run_python(env: dict, script: Path, *argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *argv], env=env, capture_output=True, text=True, timeout=timeout
    )
