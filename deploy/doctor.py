"""`papm doctor`: what this machine can do with this install, and what each role still needs.

Torch-free: it reads the installed packages' metadata (never imports torch unless it is
installed, to name the device) so that an edge install can run it too.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
from importlib import metadata

ROLES = ("edge", "node", "coordinator")
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


def report(role: str | None = None) -> tuple[str, bool]:
    """(the screen, whether ``role`` is complete; True when no role is named)."""
    from ..shared.cpu import cpu_features

    lines = []
    try:
        version = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        version = "(not installed as a package)"
    lines.append(f"papm {version} on Python {platform.python_version()} ({platform.system()} {platform.machine()})")
    f = cpu_features()
    int8 = "u8 activations" + (", 7-bit weights (reduce_range: no VNNI)" if f["x86"] and not f["vnni"] else ", 8-bit weights")
    lines.append(f"CPU: {f['isa']}; INT8 export here: {int8}")
    try:
        import onnxruntime as ort

        lines.append(f"ONNX Runtime {ort.__version__}: providers {', '.join(ort.get_available_providers())}")
    except ImportError:
        lines.append("ONNX Runtime: not installed")
    if check("torch") is None:
        import torch

        gpu = f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CUDA not available"
        lines.append(f"torch {torch.__version__}: device {'cuda' if torch.cuda.is_available() else 'cpu'} ({gpu})")
    else:
        lines.append("torch: not installed (fine for the edge role)")
    roles = role_requirements()
    if not roles:
        return "\n".join(lines + ["papm-fl is not installed as a distribution; install it with pip to check its roles"]), False
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
            fixes.append(f'pip install "papm-fl[{r}]"   (from a checkout: pip install -e ".[{r}]" -c constraints.txt)')
    if fixes:
        lines += ["", "fix: " + fixes[0]]
    return "\n".join(lines), complete.get(role, True) if role else True


def add_doctor_parser(sub) -> argparse.ArgumentParser:
    d = sub.add_parser("doctor", help="what this install can run (edge, node, coordinator) and what is missing")
    d.add_argument("--role", choices=ROLES, default=None, help="exit 1 unless this role is complete")
    return d


def run_doctor(args) -> int:
    text, ok = report(args.role)
    print(text)
    if args.role and not ok:
        print(f"the {args.role} role is not complete (see above)", file=sys.stderr)
        return 1
    return 0
