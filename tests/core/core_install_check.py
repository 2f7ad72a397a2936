"""Run by `test_core_install.py` with the interpreter of a venv that has only `pip install .` (no extras):
the core's Trainer paths and its model card work without timm, torchvision, datasets or matplotlib, and a
plain source checkout on `PYTHONPATH` imports and finds its card template too."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared helpers

from helpers import run_docstring_example, tiny_text_classifier, token_dataset  # noqa: E402

import hf_rifle  # noqa: E402
from hf_rifle.card import NO_PLOT_NOTE  # noqa: E402

present = [name for name in ("timm", "torchvision", "datasets", "matplotlib") if importlib.util.find_spec(name)]
assert not present, f"not a core-only install: {present} are installed"
assert "site-packages" in hf_rifle.__file__, f"hf_rifle comes from {hf_rifle.__file__}, not the installed package"

# Plain Trainer + RifleTrainerCallback, and RifleTrainer with L2-SP, on a transformers text classifier.
for documented in (hf_rifle.RifleConfig, hf_rifle.RifleTrainerCallback, hf_rifle.RifleTrainer):
    result = run_docstring_example(documented, {"model": tiny_text_classifier(), "train_dataset": token_dataset()})
    assert result.failed == 0, f"{documented.__name__}'s example failed"

card = Path("out", "README.md").read_text()
assert "**RIFLE** and **L2-SP**" in card and NO_PLOT_NOTE in card, card
assert not Path("out", "learning_curve.png").exists()
# A plain checkout on PYTHONPATH comes first and is used as it is, card template included.
checkout = Path(__file__).resolve().parents[2]
probe = "import hf_rifle, hf_rifle.card as card; print(hf_rifle.__file__); print(card.card_template().is_file())"
env = {**os.environ, "PYTHONPATH": str(checkout)}
printed = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
assert printed.split() == [str(checkout / "hf_rifle" / "__init__.py"), "True"], printed
print("core install: OK")
