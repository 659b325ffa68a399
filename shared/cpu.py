"""What this CPU offers integer inference (no torch, no numpy: the edge runtime and `papm doctor` use it too).

ONNX Runtime's x86 integer kernels are fastest with unsigned 8-bit activations and signed
8-bit weights (U8S8); on x86 CPUs without VNNI (AVX2 or AVX-512 without VNNI) the U8S8
multiply-add can saturate, which 7-bit weights (``reduce_range``) avoid. ARM CPUs with the
dot-product extension run both signed and unsigned activations fast.
"""

from __future__ import annotations

import platform
from functools import lru_cache


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
