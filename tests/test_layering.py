"""The package layering of docs/architecture.md: a package imports only the packages below it."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# what each package may import (besides itself): docs/architecture.md, "The shape"
ALLOWED = {
    "core": set(),
    "cohort": {"core"},
    "synth": {"core", "cohort"},
    "eval": {"core", "cohort"},
    "segment": {"core", "cohort", "eval"},
    "flows": {"core", "cohort", "synth", "eval", "segment"},
    "medddpm": {"core", "cohort", "synth", "eval", "segment", "flows"},
}


def _imported_packages(package: str, repo: Path = REPO) -> dict[str, set[str]]:
    """{file: project packages it imports} for every module of ``package`` (lazy imports inside functions too)."""
    out = {}
    for f in sorted((repo / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out[str(f.relative_to(repo))] = names & set(ALLOWED) - {package}
    return out


def test_no_package_imports_upwards():
    bad = {f: sorted(imported - ALLOWED[pkg]) for pkg in ALLOWED for f, imported in _imported_packages(pkg).items()
           if imported - ALLOWED[pkg]}
    assert not bad, f"imports against the layering of docs/architecture.md: {bad}"


def test_the_check_sees_an_upward_import(tmp_path):
    """The walk finds a lazy import inside a function (so the test above could fail)."""
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "x.py").write_text("import os\n\ndef f():\n    from flows.plan import StudyParams\n")
    assert _imported_packages("core", tmp_path) == {"core/x.py": {"flows"}}
