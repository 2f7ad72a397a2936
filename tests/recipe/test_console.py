"""What a person sees from `hf-rifle-train`, run as a real command: the demo's console (hf_rifle's INFO, no warning
when nothing needs action), and each user error as one line on stderr with its documented exit code, no traceback;
`HF_RIFLE_DEBUG=1` brings the traceback back, and a bug keeps it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_rifle import period_starts
from hf_rifle.recipe import parse_args
from hf_rifle.recipe.errors import BAD_SETTINGS, DATA_OR_HUB, DISK_FULL, EXIT_CODES_HELP, exit_code

from ..helpers import recipe_flags
from .test_full_disk import fill, small_disk  # noqa: F401 (a fixture)

COMMAND = Path(sys.executable).with_name("hf-rifle-train")


def hf_rifle_train(*argv, cwd: Path, **env) -> subprocess.CompletedProcess:
    """`hf-rifle-train argv` in `cwd`, offline unless `env` says otherwise, on one thread."""
    settings = {key: value for key, value in os.environ.items() if key != "HF_RIFLE_DEBUG"}
    settings.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env})
    settings = {key: value for key, value in settings.items() if value is not None}
    return subprocess.run([str(COMMAND), *argv], cwd=cwd, env=settings, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_demo_shows_its_own_info_and_no_warning(tmp_path):
    """A short demo (4 images per class, at a learning rate at which its heads fit in their 8-epoch periods): the
    expected events (images cached, the head replaced, each fitted head re-drawn) show at INFO, and no line of
    hf_rifle's is a WARNING; the closing summary still lists every decision."""
    flags = ["--samples_per_class", "4", "--learning_rate", "0.05", "--max_eval_samples", "20"]
    run = hf_rifle_train(*flags, "--output_dir", str(tmp_path / "demo"), cwd=tmp_path)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert "INFO hf_rifle.recipe.models: Replaced the pretrained 1000-class head" in output
    assert output.count("INFO hf_rifle.attach: RIFLE: re-initialized the head") == 2
    assert [line for line in output.splitlines() if "WARNING hf_rifle" in line] == []
    assert "head re-initializations: 2 of 2 planned done" in run.stdout
    assert "INFO transformers" not in output  # other libraries stay at WARNING


@pytest.fixture(scope="module")
def user_errors(data_and_model, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """`hf-rifle-train` on each user error the recipe names, each run in a folder of its own."""
    folders, model = data_and_model
    data = ["--train_dir", str(folders["train"]), "--model_name_or_path", str(model)]
    root = tmp_path_factory.mktemp("user-errors")
    cases = {
        "unknown flag": [*data, "--no_such_flag", "1"],
        "bad value": [*data, "--train_val_split", "2"],
        "transformers' own check": [*data, "--load_best_model_at_end", "True"],
        "too many periods": [*data, "--num_periods", "50"],
        "missing data": ["--train_dir", str(root / "no-such-folder"), "--model_name_or_path", str(model)],
        "missing model": ["--train_dir", str(folders["train"]), "--model_name_or_path", str(root / "no-such-model")],
        "model not in the offline cache": ["--train_dir", str(folders["train"]), "--model_name_or_path", "someone/x"],
        "refused resume": [*data, "--resume_from_checkpoint", str(root / "no-such-checkpoint")],
    }
    results = {}
    for name, argv in cases.items():
        cwd = root / name.replace(" ", "-").replace("'", "")
        cwd.mkdir()
        results[name] = hf_rifle_train(*recipe_flags(cwd / "out", *argv), cwd=cwd), cwd
    missing_config = root / "missing-config"
    missing_config.mkdir()
    results["missing config file"] = hf_rifle_train("no-such-run.yaml", cwd=missing_config), missing_config
    return results


EXPECTED = {
    "unknown flag": (BAD_SETTINGS, "Unknown arguments for hf-rifle-train: --no_such_flag 1"),
    "bad value": (BAD_SETTINGS, "--train_val_split must lie strictly between 0 and 1, got 2.0"),
    "transformers' own check": (BAD_SETTINGS, "--load_best_model_at_end requires the save and eval strategy"),
    "too many periods": (BAD_SETTINGS, "num_periods=50 is more than the run's"),
    "missing data": (DATA_OR_HUB, "--train_dir"),
    "missing model": (DATA_OR_HUB, "is neither a local folder or file nor a Hub repository id"),
    "model not in the offline cache": (DATA_OR_HUB, "is not in the local cache, and HF_HUB_OFFLINE=1 is set"),
    "refused resume": (BAD_SETTINGS, "is not a folder. Pass a checkpoint-N folder."),
    "missing config file": (DATA_OR_HUB, "The config file no-such-run.yaml does not exist"),
}


def assert_one_line_error(run: subprocess.CompletedProcess, code: int, named: str) -> None:
    """The documented exit code, and on stderr one `hf-rifle-train: error:` line naming the problem, no traceback."""
    assert "Traceback" not in run.stderr, run.stderr[-4000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("hf-rifle-train: error: ")]
    assert len(errors) == 1 and named in errors[0], run.stderr[-4000:]
    assert run.returncode == code, (run.returncode, run.stderr[-2000:])


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("case", EXPECTED)
def test_a_user_error_is_one_line_and_its_exit_code(user_errors, case):
    run, cwd = user_errors[case]
    assert_one_line_error(run, *EXPECTED[case])
    assert not (cwd / "out").exists()  # and no output folder left behind


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_hub_that_cannot_be_reached_for_a_push_is_one_line(tmp_path, data_and_model):
    """The issue's case: --push_to_hub with no Hub listening (huggingface_hub retries for about 20 s first)."""
    folders, model = data_and_model
    argv = ["--train_dir", str(folders["train"]), "--model_name_or_path", str(model), "--push_to_hub"]
    run = hf_rifle_train(
        *recipe_flags(tmp_path / "out", *argv, "--hub_model_id", "someone/rifle-run"),
        cwd=tmp_path,
        HF_HUB_OFFLINE=None,
        HF_ENDPOINT="http://127.0.0.1:9",  # the discard port: nothing listens there
        HF_HOME=str(tmp_path / "hf-home"),
    )
    assert_one_line_error(run, DATA_OR_HUB, "could not be reached to create someone/rifle-run")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_full_disk_is_one_line_and_exit_code_4(small_disk, data_and_model):  # noqa: F811
    folders, model = data_and_model
    argv = ["--train_dir", str(folders["train"]), "--model_name_or_path", str(model), "--save_strategy", "epoch"]
    fill(small_disk, leave=64_000)
    run = hf_rifle_train(*recipe_flags(small_disk / "out", *argv), cwd=small_disk)
    assert_one_line_error(run, DISK_FULL, f"The disk under output_dir {small_disk / 'out'} is full")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_hf_rifle_debug_brings_the_traceback_back(tmp_path):
    run = hf_rifle_train("--no_such_flag", "1", "--output_dir", str(tmp_path / "out"), cwd=tmp_path, HF_RIFLE_DEBUG="1")
    assert run.returncode == 1 and "Traceback (most recent call last)" in run.stderr
    assert "ValueError: Unknown arguments for hf-rifle-train: --no_such_flag 1" in run.stderr


def test_only_errors_hf_rifle_raises_on_purpose_are_user_errors():
    """Ours, raised by a `raise` of hf_rifle's code, get their exit code; the same type raised in a library, or an
    error of another type (a bug's TypeError, say), is a bug (None: the traceback stays)."""
    with pytest.raises(ValueError) as ours:
        period_starts(2, 3)
    assert exit_code(ours.value) == BAD_SETTINGS
    with pytest.raises(ValueError) as library:
        json.loads("{")
    assert exit_code(library.value) is None
    with pytest.raises(TypeError) as bug:
        period_starts("2", 3)
    assert exit_code(bug.value) is None


def test_the_exit_codes_are_in_the_help_and_the_readme(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert " ".join(EXIT_CODES_HELP.split()) in " ".join(capsys.readouterr().out.split())  # argparse rewraps it
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for code in (1, BAD_SETTINGS, DATA_OR_HUB, DISK_FULL, 143):
        assert f"; {code} " in EXIT_CODES_HELP and f"| `{code}` |" in readme
