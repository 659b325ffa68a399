"""What this CPU offers integer inference, and how many of its cores this process may use (no torch, no numpy:
the edge runtime and `papm doctor` use it too).

ONNX Runtime's x86 integer kernels are fastest with unsigned 8-bit activations and signed
8-bit weights (U8S8); on x86 CPUs without VNNI (AVX2 or AVX-512 without VNNI) the U8S8
multiply-add can saturate, which 7-bit weights (``reduce_range``) avoid. ARM CPUs with the
dot-product extension run both signed and unsigned activations fast.
"""

from __future__ import annotations

import math
import os
import platform
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def cpu_features() -> dict:
    """{"arch", "avx2", "avx512", "vnni", "arm_dotprod", "isa", "x86", "arm"}: read from /proc/cpuinfo (Linux),
    else from the platform."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    flags.update(value.split())
    except OSError:
        pass
    return features_from(platform.machine(), flags, platform.system())


def features_from(machine: str, flags: set[str], system: str = "Linux") -> dict:
    """The features of a CPU from its architecture name and its /proc/cpuinfo flags (x86 "flags", ARM "Features")."""
    arch = machine.lower()
    x86 = arch in ("x86_64", "amd64", "i686", "i386")
    arm = arch in ("aarch64", "arm64") or arch.startswith("arm")
    info = {
        "arch": arch,
        "avx2": "avx2" in flags,
        "avx512": "avx512f" in flags,
        "vnni": bool(flags & {"avx512_vnni", "avx_vnni"}),
        "arm_dotprod": "asimddp" in flags or (arm and system == "Darwin"),  # every Apple silicon core has it
    }
    names = [n for n, on in (("AVX2", info["avx2"]), ("AVX-512", info["avx512"]), ("VNNI", info["vnni"]),
                             ("ARM dot-product", info["arm_dotprod"])) if on]
    info["isa"] = f"{arch}: {', '.join(names) if names else 'no integer dot-product extension found'}"
    info["x86"], info["arm"] = x86, arm
    return info


def reduce_range_needed() -> bool:
    """7-bit weights for U8S8 on x86 without VNNI (where the 8-bit multiply-add saturates)."""
    f = cpu_features()
    return bool(f["x86"] and not f["vnni"])


def usable_cpus() -> int:
    """The CPUs this process may keep busy: its affinity mask (taskset, ``docker --cpuset-cpus``) capped by its
    cgroup's CPU quota (``docker --cpus``, a Kubernetes limit). ``os.cpu_count()`` sees neither, and ONNX Runtime
    sizes its default pool to the host's physical cores, so a container given 2 of 64 cores would run 32 threads."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        n = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))  # floor, as Go's automaxprocs: a thread more than the quota is throttled
    return max(1, n)


def cgroup_cpu_limit(root: Path | str = "/sys/fs/cgroup", proc_cgroup: Path | str = "/proc/self/cgroup") -> float | None:
    """This process's cgroup CPU quota in CPUs (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``),
    the tightest along its cgroup path; None where there is no quota or no cgroup file system (not Linux)."""
    root = Path(root)
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    paths = {"v2": "/", "v1": "/"}
    for line in lines:  # "0::/path" (v2); "4:cpu,cpuacct:/path" (v1)
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] == "0" and not parts[1]:
            paths["v2"] = parts[2]
        elif len(parts) == 3 and "cpu" in parts[1].split(","):
            paths["v1"] = parts[2]
    limits = []
    for folder in _ancestors(root, paths["v2"]):
        limits.append(_read_quota(folder / "cpu.max", None))
    for base in (root / "cpu", root / "cpu,cpuacct"):
        for folder in _ancestors(base, paths["v1"]):
            limits.append(_read_quota(folder / "cpu.cfs_quota_us", folder / "cpu.cfs_period_us"))
    found = [q for q in limits if q is not None]
    return min(found) if found else None


def _ancestors(base: Path, path: str) -> list[Path]:
    """``base`` joined with the cgroup path and each of its parents (in a container the path is often "/")."""
    parts = [p for p in path.strip("/").split("/") if p and p != ".."]
    return [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _read_quota(quota_file: Path, period_file: Path | None) -> float | None:
    try:
        text = quota_file.read_text().split()
        if period_file is None:  # v2: "max 100000" or "200000 100000"
            quota, period = text[0], text[1]
        else:
            quota, period = text[0], period_file.read_text().split()[0]
        if quota == "max" or int(quota) <= 0:  # v1 writes -1 for no quota
            return None
        return int(quota) / int(period)
    except (OSError, IndexError, ValueError, ZeroDivisionError):
        return None


def fit_torch_threads() -> int:
    """Cap torch's intra-op threads at ``usable_cpus()`` (torch follows the affinity mask but not a cgroup quota) unless
    OMP_NUM_THREADS chose them; returns the thread count. Imports torch: for the training side only."""
    import torch

    usable = usable_cpus()
    if not os.environ.get("OMP_NUM_THREADS") and torch.get_num_threads() > usable:
        torch.set_num_threads(usable)
    return torch.get_num_threads()
