"""The package's layers read one way: shared <- export <- deploy <- client <- server <- simulations <- cli.

A module may import its own folder and the folders below it, never one above; imports inside
the package are relative (so import graphs and IDEs see the layers); ``shared/`` imports no
Flower; every phase of the run has one module.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["shared", "export", "deploy", "client", "server", "simulations", "cli"]  # bottom to top
FOLDERS = LAYERS[:-1]


def layer_of_module(parts: list[str]) -> str:
    """Layer of the package module ``papm.<parts>`` (the root package's own modules are the CLI)."""
    return parts[0] if parts and parts[0] in FOLDERS else "cli"


def imports_of(path: Path, root: Path) -> list[tuple[int, list[str], bool]]:
    """(line, imported module as parts below ``papm``, written as an absolute papm import) per import."""
    rel = path.relative_to(root).with_suffix("").parts
    package = list(rel[:-1])  # the importing module's package, below papm
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = base + (node.module.split(".") if node.module else [])
                found.append((node.lineno, target, False))
            elif node.module and node.module.split(".")[0] == "papm":
                found.append((node.lineno, node.module.split(".")[1:], True))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "papm":
                    found.append((node.lineno, alias.name.split(".")[1:], True))
    return found


def package_modules(root: Path) -> list[Path]:
    return [root / "cli.py", root / "__init__.py"] + sorted(p for f in FOLDERS for p in (root / f).rglob("*.py"))


def layering_violations(root: Path) -> list[str]:
    """Every upward import and every absolute ``papm.`` import inside the package under ``root``."""
    problems = []
    for path in package_modules(root):
        if not path.exists():
            continue
        rel = list(path.relative_to(root).with_suffix("").parts)
        here = layer_of_module(rel)
        for line, target, absolute in imports_of(path, root):
            where = f"{path.relative_to(root)}:{line}"
            if absolute:
                problems.append(f"{where} imports papm.{'.'.join(target)} absolutely; use a relative import")
            there = layer_of_module(target)
            if LAYERS.index(there) > LAYERS.index(here):
                problems.append(f"{where}: {here}/ imports {there}/ ({'.'.join(target)}), a layer above it")
    return problems


def test_no_module_imports_a_layer_above_it():
    assert layering_violations(REPO) == []


def test_the_checker_finds_upward_and_absolute_imports(tmp_path):
    """The check above can fail: a tree with an upward import, a sideways client->server one and an absolute one."""
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "cli.py").write_text("from .server import x\n")
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "shared" / "a.py").write_text("from ..server.driver import RunDriver\n")
    (tmp_path / "export" / "b.py").write_text("def f():\n    from ..deploy import bundle\n")
    (tmp_path / "client" / "c.py").write_text("from ..server import messaging\nfrom .records import x\n")
    (tmp_path / "deploy" / "d.py").write_text("from papm.shared.errors import PapmError\n")
    problems = layering_violations(tmp_path)
    assert any(p.startswith("shared/a.py:1: shared/ imports server/") for p in problems)
    assert any(p.startswith("export/b.py:2: export/ imports deploy/") for p in problems)
    assert any(p.startswith("client/c.py:1: client/ imports server/") for p in problems)
    assert any("deploy/d.py:1 imports papm.shared.errors absolutely" in p for p in problems)
    assert len(problems) == 4, problems  # cli -> server and client -> client are allowed


def test_shared_never_imports_flower():
    """Importing every papm.shared module leaves flwr out of sys.modules (shared is the pure core)."""
    modules = sorted(p.stem for p in (REPO / "shared").glob("*.py") if p.stem != "__init__")
    code = ("import sys\n" + "".join(f"import papm.shared.{m}\n" for m in modules)
            + "bad = sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.'))\n"
            + "print(len(bad)); assert not bad, bad[:5]\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "0" and len(modules) >= 15


def test_every_phase_has_one_module():
    from papm.server.phases import PHASE_RUNNERS
    from papm.shared.config import PHASES

    assert list(PHASE_RUNNERS) == list(PHASES)
    for name, runner in PHASE_RUNNERS.items():
        assert runner.__module__ == f"papm.server.phases.{name}"


@pytest.mark.parametrize("mod", ["papm.client.client_app", "papm.client.records"])
def test_client_side_never_imports_the_server(mod):
    code = f"import sys, {mod}\nassert not [m for m in sys.modules if m.startswith('papm.server')]\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_every_package_folder_is_installed():
    """A subpackage missing from pyproject.toml works in the editable checkout and is absent from a wheel."""
    import tomllib

    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = sorted({p.parent for f in FOLDERS for p in (REPO / f).rglob("__init__.py")})
    names = {"papm." + ".".join(d.relative_to(REPO).parts): d.relative_to(REPO).as_posix() for d in folders}
    assert set(names) <= set(setup["packages"]), sorted(set(names) - set(setup["packages"]))
    assert all(setup["package-dir"].get(name) == path for name, path in names.items())


MODULE_LINES = 330  # "about 300": a module past it is split by job (DESIGN.md, "The layers")


def test_no_module_outgrows_one_job():
    long = {str(p.relative_to(REPO)): n for p in package_modules(REPO) if p.exists()
            and (n := len(p.read_text(encoding="utf-8").splitlines())) > MODULE_LINES}
    assert not long, f"split these by job: {long}"
