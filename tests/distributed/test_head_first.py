"""The head-first methods run on one process: on two (torchrun, gloo on CPU) every rank refuses with the same
one-line message and exit code, before training."""

import re
from pathlib import Path

import pytest

from ..paper.test_head_first import ColourRuns
from ..recipe.test_preemption import finish, run_worker

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

WORKER = Path(__file__).with_name("baselines_worker.py")


@pytest.mark.parametrize(
    "method, message",
    [
        ("lp_ft", "baselines_worker: error: lp_ft fits its linear probe in one process: run it without torchrun"),
        ("freeze_then_unfreeze", "baselines_worker: error: freeze_then_unfreeze runs on one process and one device"),
    ],
)
def test_every_rank_refuses_a_head_first_method_with_the_same_message(tmp_path, method, message):
    runs = ColourRuns(tmp_path)
    worker = run_worker(runs.flags(tmp_path / "run", method), processes=2, worker=WORKER)
    errors = finish(worker)
    assert worker.returncode != 0
    refusals = re.findall(r"baselines_worker: error: [^\n]*", errors)  # a progress bar may start the line
    assert len(refusals) == 2 and len(set(refusals)) == 1 and refusals[0].startswith(message), errors[-3000:]
    assert not re.search(r'File ".*hf_rifle/', errors)  # no traceback of ours (torchrun prints its own summary)
    assert not (tmp_path / "run").exists()
