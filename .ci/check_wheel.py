"""Fail unless the wheel holds every file hf_rifle reads at run time, so a file the checkout has but the package lacks
is caught here, not by a user (`python .ci/check_wheel.py dist/hf_rifle-*.whl`).

The files are declared in `RUNTIME_FILES`, each with what reads it. Two checks keep the list honest: every file of
the source packages that is not Python must be declared (a new template added without a line here fails), and every
module of the source packages must be in the wheel (a subpackage missing from pyproject's `packages` fails).
"""

import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# In-wheel path -> what reads it at run time.
RUNTIME_FILES = {
    "hf_rifle/model_cards/rifle_image_classifier.md": "hf_rifle.card: the model card's template (every card, push)",
}
LICENSE_FILES = ["LICENSE"]  # pyproject's license-files, under the wheel's .dist-info/licenses/


def source_packages() -> dict[str, Path]:
    """The packages pyproject.toml declares, by installed path (`hf_rifle/model_cards`), with their checkout folders."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = tool.get("package-dir", {})
    return {name.replace(".", "/"): ROOT / folders.get(name, name.replace(".", "/")) for name in tool["packages"]}


def shipped_source_files() -> tuple[set[str], set[str]]:
    """The checkout's files of each package, by their in-wheel path: (Python modules, other files)."""
    modules, others = set(), set()
    for installed, folder in source_packages().items():
        for path in folder.iterdir():
            if path.is_file() and path.suffix != ".pyc":
                (modules if path.suffix == ".py" else others).add(f"{installed}/{path.name}")
    return modules, others


def problems(wheel: Path) -> list[str]:
    """What is wrong with `wheel`, as lines naming the file and the fix; empty when nothing is."""
    names = set(zipfile.ZipFile(wheel).namelist())
    modules, others = shipped_source_files()
    found = [f"{path} (read by {RUNTIME_FILES[path]}) is missing" for path in RUNTIME_FILES if path not in names]
    found += [f"{path} is missing: add its package to [tool.setuptools] packages" for path in modules - names]
    found += [
        f"{path} is in the source packages but not declared in .ci/check_wheel.py's RUNTIME_FILES: declare what reads "
        "it, or move it out of the package"
        for path in sorted(others - set(RUNTIME_FILES))
    ]
    licenses = {Path(name).name for name in names if ".dist-info/licenses/" in name}
    found += [f"{name} is not in the wheel's .dist-info/licenses/" for name in LICENSE_FILES if name not in licenses]
    return found


def main(wheels: list[str]) -> int:
    if len(wheels) != 1:
        print("usage: check_wheel.py dist/hf_rifle-VERSION-py3-none-any.whl", file=sys.stderr)
        return 2
    found = problems(Path(wheels[0]))
    for line in found:
        print(f"check_wheel: {wheels[0]}: {line} (fix pyproject.toml's package-data or packages)", file=sys.stderr)
    if not found:
        print(f"check_wheel: {wheels[0]} holds every run-time file ({', '.join(RUNTIME_FILES)}) and the license")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
