"""The core alone (`pip install .`, no extras) runs both Trainer paths and writes its card.

Needs a venv of its own, so it runs when `HF_RIFLE_CORE_PYTHON` names that venv's interpreter; `.ci/run`
builds one and sets it.
"""

import os
import subprocess
from pathlib import Path

import pytest

CORE_PYTHON = os.environ.get("HF_RIFLE_CORE_PYTHON")
CHECK = Path(__file__).with_name("core_install_check.py")


@pytest.mark.multiprocess
@pytest.mark.skipif(
    not CORE_PYTHON,
    reason="set HF_RIFLE_CORE_PYTHON to the python of a venv with only `pip install .` (.ci/run builds one)",
)
def test_core_install_runs_the_trainer_paths_and_writes_the_card(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(
        [os.path.abspath(CORE_PYTHON), str(CHECK)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-4000:]
    assert "core install: OK" in finished.stdout
