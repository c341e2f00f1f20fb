"""The package's folders are its layers, and imports only go down: every import in every module
(function-level ones too) names its own folder or a lower layer, never a neighbour's. README's
Layout table lists exactly the modules there are."""

import ast
import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gn_diffusion"

# Lowest first. The bottom is the package's top-level modules (config, errors, files, ...).
LAYERS = [
    {"<bottom>"},
    {"kernels"},
    {"model"},
    {"diffusion", "data"},
    {"run_folder"},
    {"sample"},
    {"train", "evaluate"},
    {"ablation"},
]
RANK = {folder: rank for rank, folders in enumerate(LAYERS) for folder in folders}


def folder_of(module: str) -> str:
    """'gn_diffusion.train.loop' -> 'train'; a top-level module is '<bottom>'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else "<bottom>"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every gn_diffusion import in the file, wherever it sits."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            found += [(node.lineno, f"{target}.{a.name}" if node.module is None else target) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gn_diffusion"):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("gn_diffusion")]
    return found


def layer_violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = folder_of(module_name(path))
        for line, target in imported_modules(path):
            other = folder_of(target)
            if other != own and RANK[other] >= RANK[own]:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {target} ({other})")
    return bad


def test_every_folder_has_a_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(RANK) - {"<bottom>"}


def test_imports_only_go_down():
    assert layer_violations() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """A bottom module importing the model, even inside a function, is caught."""
    fake = tmp_path / "gn_diffusion"
    for folder in RANK:
        if folder != "<bottom>":
            (fake / folder).mkdir(parents=True)
            (fake / folder / "__init__.py").write_text("")
    (fake / "config.py").write_text("def f():\n    from .model.unet import GNUNet\n")
    (fake / "model" / "unet.py").write_text("from ..config import f\n")  # downward: allowed
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert layer_violations() == ["gn_diffusion/config.py:2 (<bottom>) imports gn_diffusion.model.unet (model)"]


def readme_layout() -> dict[str, set[str]]:
    """Folder ('<bottom>' for the top level) -> the modules README's Layout table lists in it."""
    section = (PACKAGE.parent / "README.md").read_text().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    listed: dict[str, set[str]] = {}
    for row in (line for line in section.splitlines() if line.startswith("|")):
        modules = re.sub(r"\([^)]*\)", "", row.split("|")[2])  # asides such as "(`check_run`, then the loop)"
        for folder, names in re.findall(r"`(\w+)/`: ((?:`\w+`[ ,]*)+)", modules):
            listed[folder] = set(re.findall(r"`(\w+)`", names))
        if row.split("|")[1].strip() == "bottom":
            listed["<bottom>"] = set(re.findall(r"`(\w+)\.py`", modules))
    return listed


def test_readme_layout_table_lists_every_module_and_no_other():
    tree: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if not path.name.startswith("__"):
            folder = path.parent.name if path.parent != PACKAGE else "<bottom>"
            tree.setdefault(folder, set()).add(path.stem)
    assert readme_layout() == tree
