"""The package's shape: three layers with imports only going down, the public API the README lists, docstring
examples that run, one docstring dialect."""

import ast
import re
from pathlib import Path

import pytest

import hf_rifle
from hf_rifle import RifleConfig, RifleTrainer, RifleTrainerCallback

from .helpers import run_docstring_example, tiny_text_classifier, token_dataset

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_rifle"
LAYERS = {"core": 0, "recipe": 1, "paper": 2}  # a layer may import its own and lower ones


def layer_of(module: str) -> str:
    """'hf_rifle.recipe.data' -> 'recipe'; 'hf_rifle.heads' and 'hf_rifle' -> 'core'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "core"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_hf_rifle_modules(path: Path) -> set[str]:
    """Every hf_rifle module `path` imports, at the top or inside functions, relative imports resolved."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            imported |= {f"{base}.{alias.name}" for alias in node.names} if not node.module else {base}
    return {name for name in imported if name == "hf_rifle" or name.startswith("hf_rifle.")}


def test_imports_only_go_down_the_layers():
    upward = [
        f"{module_name(path)} ({layer_of(module_name(path))}) imports {target} ({layer_of(target)})"
        for path in sorted(PACKAGE.rglob("*.py"))
        for target in sorted(imported_hf_rifle_modules(path))
        if LAYERS[layer_of(target)] > LAYERS[layer_of(module_name(path))]
    ]
    assert not upward, "\n".join(upward)
    # The scan sees what it must: the recipe does import the core, the paper kit the recipe.
    assert "hf_rifle.trainer" in imported_hf_rifle_modules(PACKAGE / "recipe" / "images.py")
    assert "hf_rifle.recipe" in imported_hf_rifle_modules(PACKAGE / "paper" / "baselines.py")


def readme_public_api() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Public API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^- `(\w+)`", section, flags=re.MULTILINE)


def test_public_api_is_what_the_readme_lists():
    assert sorted(hf_rifle.__all__) == sorted(readme_public_api())
    assert all(hasattr(hf_rifle, name) for name in hf_rifle.__all__)


@pytest.mark.parametrize("documented", [RifleConfig, RifleTrainer, RifleTrainerCallback], ids=lambda c: c.__name__)
def test_docstring_example_runs(documented, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    globs = {"model": tiny_text_classifier(), "train_dataset": token_dataset()}
    assert run_docstring_example(documented, globs).failed == 0


def test_one_docstring_dialect():
    """Markdown code spans and Google-style sections: no reST double backticks or field lists."""
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if re.search(r"``|:param |:returns?:|:rtype:", line)
    ]
    assert not offenders, offenders


def test_ci_runs_the_test_commands_the_readme_gives():
    """README's quick command and the slow rest of the suite are, as written, what .ci/run runs: every test in CI."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    commands = [line for block in blocks for line in block.splitlines() if "pytest" in line]
    assert [command.rsplit("pytest", 1)[1] for command in commands] == [' -m "not slow"', " -m slow"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert all(command in ci for command in commands), commands


def bibtex_block(markdown: str) -> str:
    return re.search(r"```bibtex\n(.*?)```", markdown, re.S).group(1)


def test_readme_card_and_citation_file_cite_the_same_paper():
    """One citation everywhere: README's BibTeX is the model card's (its template escapes braces for jinja), and
    CITATION.cff's preferred citation has the same title and authors."""
    import yaml

    card = (ROOT / "model_cards" / "rifle_image_classifier.md").read_text()
    card_bibtex = bibtex_block(card).replace("{{ '{' }}", "{").replace("{{ '}' }}", "}")
    assert bibtex_block((ROOT / "README.md").read_text()) == card_bibtex
    cited = yaml.safe_load((ROOT / "CITATION.cff").read_text())["preferred-citation"]
    authors = " and ".join(f"{a['family-names']}, {a['given-names']}" for a in cited["authors"])
    assert f"title     = {{{cited['title']}}}" in card_bibtex and f"author    = {{{authors}}}" in card_bibtex
    assert cited["year"] == 2020 and (ROOT / "LICENSE").read_text().count("Apache License") >= 1
