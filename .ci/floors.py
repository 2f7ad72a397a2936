"""Print the lowest version pyproject.toml allows for each requirement that has a floor (`name>=version`), as pip
constraints (`name==version`): CI installs them to test the versions the project declares."""

import re
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
for requirement in [*project["dependencies"], *sum(project["optional-dependencies"].values(), [])]:
    if floor := re.fullmatch(r"([\w.-]+)>=([\w.]+)", requirement):
        print(f"{floor[1]}=={floor[2]}")
