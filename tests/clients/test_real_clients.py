"""Real clients: transformers' Accelerate example `run_image_classification_no_trainer.py` and timm's `train.py`
(offline copies in ../shared/peer/) adopt RIFLE with the diffs in docs/patches/, applied by `patch -p1` to copies in
a temporary folder, and run as subprocesses for 12 optimizer updates of a tiny model on a tiny image folder.

Both runs are 4 epochs of 3 updates with K = 3, so the head is re-drawn at updates 4 and 8, in the middle of
epochs 1 and 2; the resumed run starts from the checkpoint after epoch 1 (6 updates done). Runs go through
head_lr_probe.py (all but the no_trainer resume, run as plain `python script.py`), which measures every update's
learning rates from outside (see its docstring): it knows nothing of RIFLE, and on the unpatched script it measures
the head moving at the scheduler's learning rate. docs/any_loop.md shows the diffs and what each test checks.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from hf_rifle import reinit_steps
from hf_rifle.attach import STATE_KEY
from hf_rifle.fit import FITTED_LOSS_RATIO

from ..helpers import native_resnet, save_timm_hub_folder, write_image_folders

ROOT = Path(__file__).resolve().parents[2]
PEER = ROOT.parent / "shared" / "peer"
PATCHES = ROOT / "docs" / "patches"
PROBE = Path(__file__).with_name("head_lr_probe.py")
NO_TRAINER, TIMM = "run_image_classification_no_trainer.py", "timm_train.py"

UPDATES, PERIODS, UPDATES_PER_EPOCH = 12, 3, 3
RESUMED_AT = 2 * UPDATES_PER_EPOCH  # the checkpoint after epoch 1 (epochs count from 0 in both scripts)
REINIT_LINE = re.compile(r"RIFLE: re-initialized the head '([\w.]+)' at step (\d+) of (\d+)")
MEASURED = dict(rel=1e-4)  # the probe's rates are least-squares fits on float32 weights: ~1e-6 off in practice

needs_peer_scripts = pytest.mark.skipif(
    not PEER.is_dir() or shutil.which("patch") is None, reason="needs ../shared/peer/ and the `patch` program"
)


def runs_scripts(test):
    """Slow, starts processes, and needs the peer scripts."""
    return pytest.mark.slow(pytest.mark.multiprocess(needs_peer_scripts(test)))


@dataclass
class Run:
    output: str  # stdout and stderr
    updates: list[dict]  # the probe's record of each optimizer update; empty for a run without the probe
    output_dir: Path

    @property
    def reinits(self) -> list[int]:
        return [int(step) for _, step, _ in REINIT_LINE.findall(self.output)]


def patched_copy(folder: Path, script: str) -> Path:
    """The peer script copied into `folder`, with its diff from docs/patches/ applied as a user would."""
    folder.mkdir()
    shutil.copy(PEER / script, folder / script)
    diff = PATCHES / f"{Path(script).stem}.diff"
    patched = subprocess.run(["patch", "-p1", "--batch", "-i", str(diff)], cwd=folder, capture_output=True, text=True)
    assert patched.returncode == 0, f"{diff.name} no longer applies to {script}:\n{patched.stdout}{patched.stderr}"
    return folder / script


def start(script: Path, argv: list[str], run_dir: Path, probe: bool = True) -> tuple[subprocess.Popen, Path]:
    """`python script argv` (through the probe unless `probe=False`), offline, one thread, this checkout's hf_rifle."""
    run_dir.mkdir()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(run_dir / "datasets-cache"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, *([str(PROBE), str(run_dir / "updates.jsonl")] if probe else []), str(script), *argv]
    with open(run_dir / "log.txt", "w") as log:  # a file, not a pipe: two runs at once never block on a full pipe
        process = subprocess.Popen(command, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    return process, run_dir


def finish(**started: tuple[subprocess.Popen, Path]) -> dict[str, Run]:
    """Wait for every started run (none is left behind when one fails), then read their logs and probe records."""
    for process, _ in started.values():
        process.wait(timeout=600)
    runs = {}
    for name, (process, run_dir) in started.items():
        output = (run_dir / "log.txt").read_text()
        assert process.returncode == 0, f"{name}: {output[-4000:]}"
        records = run_dir / "updates.jsonl"
        updates = [json.loads(line) for line in records.read_text().splitlines()] if records.exists() else []
        runs[name] = Run(output, updates, run_dir / "output")
    return runs


def expected_head_lr(update: int, peak: float) -> float:
    """The paper's head learning rate, written out: 0.5 * peak * (1 + cos(pi * tau / P)) in each period."""
    starts = [k * UPDATES // PERIODS for k in range(PERIODS)] + [UPDATES]
    period = max(k for k in range(PERIODS) if starts[k] <= update)
    return 0.5 * peak * (1 + math.cos(math.pi * (update - starts[period]) / (starts[period + 1] - starts[period])))


def check_learning_rates(run: Run, rifle: bool, first_update: int = 0) -> None:
    """Every update: the backbone moved at the scheduler's rate (the probe measures right), and the head at the
    cyclic cosine of its update index (RIFLE) or at the scheduler's rate too (the unpatched script)."""
    assert [u["update"] + first_update for u in run.updates] == list(range(first_update, UPDATES))
    for u in run.updates:
        update = u["update"] + first_update
        assert u["backbone_lr"] == pytest.approx(u["lr"], **MEASURED), update
        head_lr = expected_head_lr(update, u["initial_lr"]) if rifle else u["lr"]
        assert u["head_lr"] == pytest.approx(head_lr, **MEASURED), update


def test_each_client_adopts_rifle_in_at_most_five_changed_lines():
    for diff in (PATCHES / "run_image_classification_no_trainer.diff", PATCHES / "timm_train.diff"):
        lines = diff.read_text().splitlines()
        assert lines[0].startswith("--- a/") and lines[1].startswith("+++ b/"), diff.name
        changed = [line for line in lines[2:] if line.startswith(("+", "-"))]
        assert 0 < len(changed) <= 5, (diff.name, changed)
        assert "+import hf_rifle" in changed, diff.name


def test_docs_any_loop_shows_each_diff_as_it_is():
    page = (ROOT / "docs" / "any_loop.md").read_text()
    for diff in (PATCHES / "run_image_classification_no_trainer.diff", PATCHES / "timm_train.diff"):
        assert f"```diff\n{diff.read_text()}```" in page, diff.name
    (attach_line,) = [line for line in (PATCHES / "timm_train.diff").read_text().splitlines() if "attach(" in line]
    assert f"```text\n{add_reinit_when(attach_line[1:], 'fitted')}\n```" in page  # the line the fitted test runs


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory) -> Path:
    """train/ (6 images of each of 2 classes: 3 updates of 4 images per epoch) and validation/, for both clients."""
    root = tmp_path_factory.mktemp("images")
    write_image_folders(root)
    return root


# transformers' Accelerate loop ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_trainer_runs(tmp_path_factory, image_folders) -> dict[str, Run]:
    """The unpatched and the patched script side by side, then the patched one resumed from the second's epoch_1.

    Batches of 2 with gradient accumulation 2: 6 batches, 3 updates per epoch. The resumed run's checkpoint comes
    from the uninterrupted run, which wrote the same files an interrupted one would have (the runs are
    deterministic); it runs without the probe, as plain `python script.py`.
    """
    from transformers import ConvNextImageProcessor  # what AutoImageProcessor loads for a transformers ResNet

    root = tmp_path_factory.mktemp("no_trainer")
    native_resnet().save_pretrained(root / "model")  # 4 labels: the script re-draws a 2-class head
    ConvNextImageProcessor(size={"shortest_edge": 32}).save_pretrained(root / "model")

    def argv(name, *extra):
        return [
            *("--model_name_or_path", str(root / "model"), "--ignore_mismatched_sizes"),
            *("--train_dir", str(image_folders / "train"), "--validation_dir", str(image_folders / "validation")),
            *("--num_train_epochs", "4", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"),
            *("--learning_rate", "0.01", "--seed", "3", "--output_dir", str(root / name / "output"), *extra),
        ]

    script = with_reinit_when(patched_copy(root / "script", NO_TRAINER), "always")  # the paper's schedule
    runs = finish(
        plain=start(PEER / NO_TRAINER, argv("plain"), root / "plain"),
        patched=start(script, argv("patched", "--checkpointing_steps", "epoch"), root / "patched"),
    )
    checkpoint = runs["patched"].output_dir / "epoch_1"
    resumed = start(script, argv("resumed", "--resume_from_checkpoint", str(checkpoint)), root / "resumed", probe=False)
    return {**runs, **finish(resumed=resumed)}


@runs_scripts
def test_no_trainer_reinitializes_the_head_at_the_period_starts(no_trainer_runs):
    patched, plain = no_trainer_runs["patched"], no_trainer_runs["plain"]
    assert patched.reinits == reinit_steps(UPDATES, PERIODS) == [4, 8]  # updates, not batches: GA 2 counts once
    assert {(head, total) for head, _, total in REINIT_LINE.findall(patched.output)} == {("classifier", "12")}
    assert "RIFLE periods of" in patched.output  # attach's settings warning reaches the script's log
    assert "RIFLE" not in plain.output


@runs_scripts
def test_no_trainer_head_learning_rate_follows_the_cyclic_cosine(no_trainer_runs):
    check_learning_rates(no_trainer_runs["patched"], rifle=True)  # AdamW, linear decay: the head's rate restarts
    check_learning_rates(no_trainer_runs["plain"], rifle=False)


@runs_scripts
def test_no_trainer_resume_continues_the_periods_and_ends_on_the_uninterrupted_weights(no_trainer_runs):
    """accelerate.load_state restores the optimizer (with RIFLE's step in its param groups), the scheduler, the
    sampler and the random states, so the resumed run is the uninterrupted one, bit for bit."""
    from safetensors.torch import load_file

    patched, resumed = no_trainer_runs["patched"], no_trainer_runs["resumed"]
    optimizer_state = torch.load(patched.output_dir / "epoch_1" / "optimizer.bin", weights_only=False)
    assert {group[STATE_KEY]["step"] for group in optimizer_state["param_groups"]} == {RESUMED_AT}
    assert "Resumed from checkpoint" in resumed.output
    assert [s for s in patched.reinits if s < RESUMED_AT] + resumed.reinits == reinit_steps(UPDATES, PERIODS)
    assert resumed.reinits == [8]  # step 4 not repeated, step 8 not missed
    uninterrupted = load_file(patched.output_dir / "model.safetensors")
    after_resume = load_file(resumed.output_dir / "model.safetensors")
    assert uninterrupted.keys() == after_resume.keys()
    for name, weights in uninterrupted.items():
        assert torch.equal(after_resume[name], weights), name


# timm's train.py --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_runs(tmp_path_factory, image_folders) -> dict[str, Run]:
    """The unpatched and the patched train.py side by side, then the patched one resumed from checkpoint-1.pth.tar,
    all through the probe. timm's defaults otherwise: SGD with Nesterov momentum 0.9, weight decay 2e-5 off biases and
    norms, cosine per epoch, its training augmentation."""
    root = tmp_path_factory.mktemp("timm")
    hub = save_timm_hub_folder(root / "hub")  # pretrained test_resnet (7 classes): timm re-draws a 2-class fc

    def argv(name, *extra):
        return [
            *("--data-dir", str(image_folders), "--train-split", "train", "--val-split", "validation"),
            *("--model", "test_resnet", "--pretrained", "--pretrained-path", str(hub / "pytorch_model.bin")),
            *("--num-classes", "2", "--input-size", "3", "32", "32", "--epochs", "4", "--batch-size", "4"),
            *("--lr", "0.05", "--warmup-epochs", "0", "--workers", "0", "--device", "cpu", "--seed", "3"),
            *("--output", str(root / name), "--experiment", "output", *extra),
        ]

    script = with_reinit_when(patched_copy(root / "script", TIMM), "always")  # the paper's schedule
    fitted = with_reinit_when(patched_copy(root / "fitted-script", TIMM), "fitted")
    runs = finish(
        plain=start(PEER / TIMM, argv("plain"), root / "plain"),
        patched=start(script, argv("patched"), root / "patched"),
    )
    runs |= finish(fitted=start(fitted, argv("fitted"), root / "fitted"))
    checkpoint = runs["patched"].output_dir / "checkpoint-1.pth.tar"
    fitted_checkpoint = runs["fitted"].output_dir / "checkpoint-1.pth.tar"
    return {
        **runs,
        **finish(
            resumed=start(script, argv("resumed", "--resume", str(checkpoint)), root / "resumed"),
            fitted_resumed=start(
                fitted, argv("fitted_resumed", "--resume", str(fitted_checkpoint)), root / "fitted_resumed"
            ),
        ),
    }


def with_reinit_when(script: Path, reinit_when: str) -> Path:
    """The patched script with `reinit_when=...` added to its attach line, as docs/any_loop.md shows it."""
    script.write_text(add_reinit_when(script.read_text(), reinit_when))
    return script


ATTACH_CALL = re.compile(r"(hf_rifle\.attach\((?:[^()]|\([^()]*\))*)\)")


def add_reinit_when(text: str, reinit_when: str) -> str:
    """`text` with `reinit_when=...` as the last argument of its one `hf_rifle.attach(...)` call."""
    changed, calls = ATTACH_CALL.subn(lambda call: f'{call.group(1)}, reinit_when="{reinit_when}")', text)
    assert calls == 1
    return changed


@runs_scripts
def test_timm_reinitializes_the_head_at_the_period_starts(timm_runs):
    patched, plain = timm_runs["patched"], timm_runs["plain"]
    assert patched.reinits == reinit_steps(UPDATES, PERIODS) == [4, 8]
    assert {(head, total) for head, _, total in REINIT_LINE.findall(patched.output)} == {("fc", "12")}
    assert "RIFLE periods of" in patched.output
    assert "RIFLE" not in plain.output


@runs_scripts
def test_timm_head_learning_rate_follows_the_cyclic_cosine(timm_runs):
    check_learning_rates(timm_runs["patched"], rifle=True)  # the backbone's cosine per epoch, the head's per update
    check_learning_rates(timm_runs["plain"], rifle=False)


@runs_scripts
def test_timm_resume_continues_the_periods(timm_runs):
    """train.py's --resume restores the weights, the optimizer (RIFLE's step in its param groups) and the epoch, but
    not the random state: the resumed epochs shuffle and augment differently, so its final weights cannot equal the
    uninterrupted run's. What holds: it starts from the checkpoint's exact head, re-draws the same head at the same
    update, never repeats or misses one, and the head's learning rate continues the cyclic cosine."""
    patched, resumed = timm_runs["patched"], timm_runs["resumed"]
    checkpoint = torch.load(patched.output_dir / "checkpoint-1.pth.tar", map_location="cpu", weights_only=False)
    assert {group[STATE_KEY]["step"] for group in checkpoint["optimizer"]["param_groups"]} == {RESUMED_AT}
    assert [s for s in patched.reinits if s < RESUMED_AT] + resumed.reinits == reinit_steps(UPDATES, PERIODS)
    assert resumed.reinits == [8]
    check_learning_rates(resumed, rifle=True, first_update=RESUMED_AT)
    before = {u["update"] + RESUMED_AT: u["head_before"] for u in resumed.updates}
    assert before[RESUMED_AT] == patched.updates[RESUMED_AT]["head_before"]  # the checkpoint's trained head
    assert before[8] == patched.updates[8]["head_before"]  # period 3's head, drawn from (seed, period)
    assert before[7] != patched.updates[7]["head_before"]  # other batches in between: see the docstring
    last = torch.load(resumed.output_dir / "last.pth.tar", map_location="cpu", weights_only=False)
    assert {group[STATE_KEY]["step"] for group in last["optimizer"]["param_groups"]} == {UPDATES}


KEPT_LINE = re.compile(
    r"RIFLE: kept the head at step (\d+) of (\d+): it has not fit yet \(.* was ([\d.]+) of a uniform"
)


@runs_scripts
def test_timm_with_reinit_when_fitted_keeps_a_head_that_cannot_fit_and_resumes_the_decisions(timm_runs):
    """The images' labels are independent of their pixels, so the head cannot fit: with reinit_when="fitted" it is
    kept at both planned updates (the patched run's "always" re-draws it there), the decisions travel in the
    checkpoint's optimizer state, and the resumed run neither repeats the first nor takes the second otherwise."""
    fitted, resumed, always = timm_runs["fitted"], timm_runs["fitted_resumed"], timm_runs["patched"]
    assert fitted.reinits == [] and always.reinits == [4, 8]
    assert "RIFLE periods of" not in fitted.output  # the short-period warning is for the paper's schedule only
    kept = KEPT_LINE.findall(fitted.output)
    assert [(int(step), int(total)) for step, total, _ in kept] == [(4, 12), (8, 12)]
    assert all(float(ratio) > FITTED_LOSS_RATIO for _, _, ratio in kept)
    checkpoint = torch.load(fitted.output_dir / "checkpoint-1.pth.tar", map_location="cpu", weights_only=False)
    (state,) = {json.dumps(group[STATE_KEY]["decisions"]) for group in checkpoint["optimizer"]["param_groups"]}
    assert [(step, redrawn) for step, _, _, _, redrawn in json.loads(state)] == [(4, False)]
    assert resumed.reinits == [] and [int(step) for step, _, _ in KEPT_LINE.findall(resumed.output)] == [8]
    last = torch.load(resumed.output_dir / "last.pth.tar", map_location="cpu", weights_only=False)
    decisions = last["optimizer"]["param_groups"][0][STATE_KEY]["decisions"]
    assert [(step, redrawn) for step, _, _, _, redrawn in decisions] == [(4, False), (8, False)]
