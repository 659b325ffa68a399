"""`papm deploy init DIR`: a SuperLink + SuperNodes kit (TLS, node keys, node configs, the
`flwr` connection) and the exact commands to start the federation. Torch-free.

    papm deploy init kit --nodes 3 --hosts my.host --superlink my.host:8000
    papm deploy init kit --insecure          local experiments only: no TLS, no node authentication
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .edge_cli import positive_int


def add_deploy_parser(sub) -> argparse.ArgumentParser:
    d = sub.add_parser("deploy", help="deploy to edge devices: SuperLink/SuperNode kit with TLS and node authentication")
    dsub = d.add_subparsers(dest="deploy_command", required=True, metavar="ACTION")
    p = dsub.add_parser("init", help="write TLS material, node keys and node configs; print the commands to run",
                        description="Create a deployment kit in DIR and print the exact flower-superlink, "
                                    "`flwr supernode register`, flower-supernode and `flwr run` commands "
                                    "(also written to DIR/COMMANDS.md). TLS and node authentication are on by default.")
    p.add_argument("directory", metavar="DIR", help="kit folder (created)")
    p.add_argument("--hosts", default="", help="extra names/IPs of the SuperLink for its TLS certificate, comma separated "
                                               "(127.0.0.1 and localhost are always included)")
    p.add_argument("--nodes", type=positive_int, default=3, help="number of SuperNodes (default 3)")
    p.add_argument("--superlink", default="127.0.0.1:8000", help="address the nodes and `flwr` use, HOST:PORT (default 127.0.0.1:8000)")
    p.add_argument("--data-root-template", default="", help="each node's data folder, {id} = partition-id, e.g. /data/node{id} "
                                                            "(default: none; the built-in digits need no data)")
    p.add_argument("--data-root", default="", help="the coordinator's data folder with test/<class>/: the run scores on it "
                                                   "and checks every device's class names against it (needed with "
                                                   "--data-root-template unless --base-checkpoint names it)")
    p.add_argument("--base-checkpoint", default="", help="a base model from `papm train` for the run (its image size, "
                                                         "classes and normalisation are the run's)")
    p.add_argument("--flwr-home", default=None, help="folder of flwr's config.toml (default: $FLWR_HOME or ~/.flwr)")
    p.add_argument("--connection", default="papm", help="name of the `flwr` connection written to config.toml (default papm)")
    p.add_argument("--days", type=positive_int, default=365, help="certificate validity in days (default 365)")
    p.add_argument("--no-worker", action="store_true", help="no warm `papm node` worker beside the SuperNodes (each message "
                   "then starts torch and reads the data afresh)")
    p.add_argument("--insecure", action="store_true", help="no TLS and no node authentication: local experiments only")
    p.add_argument("--force", action="store_true", help="overwrite an existing kit and connection entry")
    return d


def run_deploy(args) -> int:
    from .kit_commands import INSECURE_WARNING
    from .kit_spec import KitSpec
    from .supernode_kit import init_kit

    if args.deploy_command != "init":  # argparse allows only init today
        raise SystemExit(f"unknown deploy action {args.deploy_command}")
    spec = KitSpec(directory=Path(args.directory), hosts=[h for h in args.hosts.split(",") if h.strip()],
                   nodes=args.nodes, superlink=args.superlink, data_root_template=args.data_root_template,
                   data_root=args.data_root, base_checkpoint=args.base_checkpoint,
                   flwr_home=Path(args.flwr_home) if args.flwr_home else None, connection=args.connection,
                   insecure=args.insecure, force=args.force, days=args.days, warm_worker=not args.no_worker)
    kit = init_kit(spec)
    print(f"kit: {kit.directory}")
    if kit.ca_cert:
        print(f"  TLS: CA {kit.ca_cert}, server certificate for {', '.join(spec.all_hosts())}")
        print(f"  node keys (ECDSA P-384, OpenSSH, private ones 0600): {kit.directory / 'keys'}")
    print(f"  node configs: {kit.directory / 'nodes'}")
    print(f"  bundle signing key pair (Ed25519): {kit.directory / 'signing'} (the private key stays on the coordinator)")
    print(f"  flwr connection [superlink.{kit.connection}] in {kit.flwr_config}")
    print()
    for what, cmd in kit.commands:
        print(f"# {what}")
        print(cmd)
        print()
    print(f"(also in {kit.commands_md})")
    if (kit.directory / "superlink.db").exists():
        # the SuperLink's database still trusts the keys registered before this kit was remade
        print(f"note: {kit.directory / 'superlink.db'} keeps earlier node registrations; delete it while the "
              "SuperLink is stopped to forget the old keys", file=sys.stderr)
    if spec.insecure:  # last, on both streams: seen on a terminal and in a log of either (an error stays alone)
        print(INSECURE_WARNING)
        print(INSECURE_WARNING, file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m papm.deploy.deploy_cli init DIR ...`` (the same as ``papm deploy init``)."""
    from ..shared.errors import OneLineParser, PapmError

    parser = OneLineParser(prog="papm")
    add_deploy_parser(parser.add_subparsers(dest="command", required=True))
    try:
        return run_deploy(parser.parse_args(["deploy", *(sys.argv[1:] if argv is None else argv)]))
    except PapmError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
