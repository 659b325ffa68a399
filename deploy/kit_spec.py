"""What `papm deploy init` is asked for: the kit's folder, hosts, nodes, SuperLink address and options,
checked before anything is written. Torch-free."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..shared.errors import PapmError

ALWAYS_HOSTS = ("127.0.0.1", "localhost")  # loopback always works, also for tests


def flwr_home(explicit: Path | None) -> Path:
    """The folder `flwr` reads config.toml from: --flwr-home, else $FLWR_HOME, else ~/.flwr (flwr's own rule)."""
    if explicit is not None:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get("FLWR_HOME")
    return Path(env).expanduser().resolve() if env else Path.home() / ".flwr"


def _valid_host(host: str) -> bool:
    """A DNS name or an IP address (IPv4 or IPv6), ASCII only."""
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.split(".")
    return (0 < len(host) <= 253 and all(0 < len(label) <= 63 and label.isascii() and label[0] != "-" and label[-1] != "-"
                                         and all(c.isalnum() or c == "-" for c in label) for label in labels))



@dataclass
class KitSpec:
    """What `papm deploy init` was asked for."""

    directory: Path
    hosts: list[str] = field(default_factory=list)
    nodes: int = 3
    superlink: str = "127.0.0.1:8000"
    data_root_template: str = ""  # e.g. "/data/node{id}"; {id} is the partition-id
    data_root: str = ""  # the coordinator's data folder (its test/ split), for the run config
    base_checkpoint: str = ""  # a trained base for the run config (shape, classes, normalisation come with it)
    flwr_home: Path | None = None  # default: $FLWR_HOME or ~/.flwr (as flwr itself resolves it)
    connection: str = "papm"
    insecure: bool = False
    force: bool = False
    days: int = 365
    project_root: Path | None = None  # where `flwr run .` runs (the folder with pyproject.toml)
    warm_worker: bool = True  # a `papm node` worker beside each SuperNode (torch and data stay loaded)

    def validate(self) -> "KitSpec":
        if self.nodes < 1:
            raise PapmError(f"--nodes must be >= 1, got {self.nodes}; give the number of devices")
        if self.days < 1:
            raise PapmError(f"--days must be >= 1, got {self.days}; give the certificates' validity in days")
        host, _, port = self.superlink.rpartition(":")
        if not host or not port.isdigit():
            example = f"{host or self.superlink or 'coordinator.lan'}:8000"
            raise PapmError(f"--superlink must be HOST:PORT, got {self.superlink!r}; e.g. --superlink {example}")
        if not 1 <= int(port) <= 65535:
            raise PapmError(f"--superlink port must be 1-65535, got {port}; e.g. {host}:8000")
        for h in [host.strip("[]"), *self.hosts]:
            if not _valid_host(h.strip()):
                raise PapmError(f"{h.strip()!r} is not a host name or IP address (letters, digits, '-' and '.' in ASCII); "
                                "fix --superlink / --hosts")
        if self.days > 36500:
            raise PapmError(f"--days must be at most 36500, got {self.days}; give fewer days")
        if self.directory.exists() and not self.directory.is_dir():
            raise PapmError(f"kit folder {self.directory} is a file; give a folder for the kit")
        for option, value in (("--data-root-template", self.data_root_template), ("--data-root", self.data_root),
                              ("--base-checkpoint", self.base_checkpoint)):
            bad = [c for c in ('"', "'", "\n", "\r", "\\", "`", "$") if c in value]
            if bad:  # it is written into command lines and TOML: a quote would inject keys or commands
                raise PapmError(f"{option} must not contain {' or '.join(repr(c) for c in bad)}; give a plain path "
                                f"such as {'/data/node{id}' if option == '--data-root-template' else '/data/photos'}")
        if self.data_root and not (Path(self.data_root).expanduser() / "test").is_dir():
            raise PapmError(f"--data-root {self.data_root} has no test/ folder; give the coordinator's data folder, which "
                            "holds the test split as test/<class>/ (the devices' own photos stay on the devices)")
        if self.base_checkpoint and not Path(self.base_checkpoint).expanduser().is_file():
            raise PapmError(f"--base-checkpoint {self.base_checkpoint} not found; give the file `papm train --out` wrote")
        if self.data_root_template and not (self.data_root or self.base_checkpoint):
            # the run would score on digits and the devices' class names would not match: refused at hello, too late
            raise PapmError("the devices read their own photos (--data-root-template) but the run has no test split of "
                            "them; give --data-root (the coordinator's folder with test/<class>/) and/or --base-checkpoint "
                            "(a model from `papm train` on such photos)")
        if not self.connection.replace("-", "").replace("_", "").isalnum():
            raise PapmError(f"--connection must be letters, digits, - or _, got {self.connection!r}")
        if self.data_root_template and "{id}" not in self.data_root_template and self.nodes > 1:
            raise PapmError(f"--data-root-template needs {{id}} (the partition-id) so each node gets its own data, "
                            f"got {self.data_root_template!r}")
        return self

    @property
    def superlink_host(self) -> str:
        return self.superlink.rpartition(":")[0].strip("[]")

    @property
    def superlink_port(self) -> int:
        return int(self.superlink.rpartition(":")[2])

    def all_hosts(self) -> list[str]:
        """The server certificate's names: loopback, the SuperLink's host and the asked ones, deduplicated."""
        out: list[str] = []
        for h in [*ALWAYS_HOSTS, self.superlink_host, *self.hosts]:
            h = h.strip()
            if h and h not in out:
                out.append(h)
        return out
