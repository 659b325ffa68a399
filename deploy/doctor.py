"""`papm doctor`: what this machine can do with this install, and what each role still needs.

Torch-free: it reads the installed packages' metadata (never imports torch unless it is
installed, to name the device) so that an edge install can run it too.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

ROLES = ("edge", "node", "coordinator")
ROLE_ALIASES = {"all": "coordinator"}  # the `all` extra is the coordinator's packages
DISTRIBUTION = "papm-fl"


def role_requirements() -> dict[str, list[str]]:
    """Role -> requirement strings, from this package's own metadata (so it matches what pip installs)."""
    try:
        reqs = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return {}
    base, extras = [], {}
    for req in reqs:
        spec, _, marker = req.partition(";")
        found = re.search(r'extra\s*==\s*["\']([\w-]+)["\']', marker)
        (extras.setdefault(found.group(1), []) if found else base).append(spec.strip())
    roles = {"edge": list(base)}
    roles["node"] = base + [r for r in extras.get("node", []) if not r.startswith(DISTRIBUTION)]
    roles["coordinator"] = roles["node"] + [r for r in extras.get("coordinator", []) if not r.startswith(DISTRIBUTION)]
    return roles


def check(requirement: str) -> str | None:
    """None when ``requirement`` is met, else what is wrong ("missing", the installed version, or the missing
    packages of an extra it names, e.g. Ray for ``flwr[simulation]``)."""
    name = re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0]
    try:
        installed = metadata.version(name)
    except metadata.PackageNotFoundError:
        return "missing"
    try:
        from packaging.requirements import Requirement

        if not Requirement(requirement).specifier.contains(installed, prereleases=True):
            return f"{installed} installed"
    except ImportError:  # no packaging module: presence is all that can be checked
        pass
    extras = re.search(r"\[([^\]]+)\]", requirement)
    for extra in (e.strip() for e in extras.group(1).split(",")) if extras else []:
        for req in metadata.requires(name) or []:
            spec, _, marker = req.partition(";")
            if re.search(rf'extra\s*==\s*["\']{re.escape(extra)}["\']', marker):
                inner = re.split(r"[\s<>=!~\[;(]", spec.strip(), maxsplit=1)[0]
                try:
                    metadata.version(inner)
                except metadata.PackageNotFoundError:
                    return f"its [{extra}] extra lacks {inner}"
    return None


def install_source() -> str:
    """What to name in a pip command: this checkout when papm runs from one (an editable install), else the
    distribution name (a wheel built from the repository, or an index that serves it)."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file():
        return str(root)
    return DISTRIBUTION


def fix_command(role: str) -> str:
    """The command that completes ``role`` in this environment."""
    source = install_source()
    if source == DISTRIBUTION:  # installed from a wheel or a copy of the repository: name it where papm-fl stands
        return f'pip install "{DISTRIBUTION}[{role}]"   ({DISTRIBUTION}: the repository\'s folder or a wheel built from it)'
    constraints = Path(source) / "constraints.txt"
    pins = f" -c {constraints}" if constraints.is_file() else ""
    return f'pip install -e "{source}[{role}]"{pins}'


def torch_line() -> str:
    """torch's version and device; an installed torch that fails to import is reported, not raised."""
    if check("torch") is not None:
        return "torch: not installed (fine for the edge role)"
    try:
        import torch

        cuda = torch.cuda.is_available()
        gpu = f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}" if cuda else "CUDA not available"
        return f"torch {torch.__version__}: device {'cuda' if cuda else 'cpu'} ({gpu})"
    except Exception as e:  # noqa: BLE001 - a broken build (a missing CUDA library, an ABI clash) is what to show
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        return f"torch: installed but `import torch` fails ({type(e).__name__}: {first}); reinstall torch for this machine"


def package_versions(names: list[str]) -> str:
    """``name version`` of every installed distribution among ``names``, in that order."""
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found) if found else "none"


def report(role: str | None = None) -> tuple[str, bool]:
    """(the screen, whether ``role`` is complete; True when no role is named)."""
    from ..shared.cpu import cgroup_cpu_limit, cpu_features, usable_cpus

    role = ROLE_ALIASES.get(role, role)
    lines = []
    try:
        version = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        version = "(not installed as a package)"
    lines.append(f"papm {version} on Python {platform.python_version()} ({platform.system()} {platform.machine()})")
    f = cpu_features()
    int8 = "u8 activations" + (", 7-bit weights (reduce_range: no VNNI)" if f["x86"] and not f["vnni"] else ", 8-bit weights")
    lines.append(f"CPU: {f['isa']}; INT8 export here: {int8}")
    quota = cgroup_cpu_limit()
    lines.append(f"CPUs this process may use: {usable_cpus()} of {os.cpu_count() or 1}"
                 + (f" (cgroup quota {quota:g})" if quota is not None else "") + "; papm sizes its threads and workers to it")
    try:
        import onnxruntime as ort

        lines.append(f"ONNX Runtime {ort.__version__}: providers {', '.join(ort.get_available_providers())}")
    except ImportError:
        lines.append("ONNX Runtime: not installed")
    lines.append(torch_line())
    roles = role_requirements()
    if not roles:
        return "\n".join(lines + ["papm-fl is not installed as a distribution; install it with pip to check its roles"]), False
    names = [re.split(r"[\s<>=!~\[;]", req, maxsplit=1)[0] for req in roles["coordinator"]]
    lines.append("packages: " + package_versions([n for n in dict.fromkeys(names) if n not in ("torch", "onnxruntime")]))
    lines.append("")
    lines.append(f"{'role':<12} {'status':<9} what it runs")
    runs = {"edge": "papm infer, papm bench (no torch)",
            "node": "a SuperNode's ClientApp: train, prune, export (papm train, papm prune)",
            "coordinator": "papm simulate, the ServerApp, papm groups, papm export, papm deploy init"}
    complete = {}
    fixes = []
    for r in ROLES:
        problems = [(req, why) for req in roles[r] if (why := check(req))]
        complete[r] = not problems
        lines.append(f"{r:<12} {'ready' if not problems else 'missing':<9} {runs[r]}")
        for req, why in problems:
            lines.append(f"{'':<22}- {req} ({why})")
        if problems and (role is None or role == r):
            fixes.append(f"fix for {r}: {fix_command(r)}")
    if fixes:
        lines += [""] + fixes
        if "-c " in fixes[-1]:
            lines.append("(on a device with its own torch build, a Jetson say, leave out -c constraints.txt: it pins "
                         "the x86 CPU wheels CI tests)")
    return "\n".join(lines), complete.get(role, True) if role else True


def add_doctor_parser(sub) -> argparse.ArgumentParser:
    d = sub.add_parser("doctor", help="what this install can run (edge, node, coordinator) and what is missing")
    d.add_argument("--role", choices=ROLES + tuple(ROLE_ALIASES), default=None,
                   help="exit 1 unless this role is complete (all: the coordinator, which has everything)")
    return d


def run_doctor(args) -> int:
    text, ok = report(args.role)
    print(text)
    if args.role and not ok:
        print(f"the {args.role} role is not complete (see above)", file=sys.stderr)
        return 1
    return 0
