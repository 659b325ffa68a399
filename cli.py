"""The `papm` command line.

Each subcommand imports what it needs when it runs, so the edge commands
(`papm infer`, `papm bench`) never import torch. Every user-facing error is
one line on stderr, ``error: <problem>; <fix>``, with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    from .shared.errors import OneLineParser
    from .simulations.centralised_cli import add_groups_parser, add_prune_parser
    from .simulations.train_cli import add_train_parser

    parser = OneLineParser(prog="papm", description="Split a trained ResNet across edge devices with PAPM pruning.")
    parser.add_argument("--version", action="version", version=f"papm {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_train_parser(sub)
    add_prune_parser(sub)
    add_groups_parser(sub)

    s = sub.add_parser("simulate", help="a whole federated run on this machine (Flower simulation)")
    s.add_argument("--config", default=None, help="TOML or YAML file with run config keys")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key (repeatable)")
    s.add_argument("--run-dir", default=None, help="run directory (default runs/demo)")
    s.add_argument("--resume", action="store_true", help="continue a run after its last completed phase")
    s.add_argument("--force", action="store_true", help="delete an existing run directory and start over")
    s.add_argument("--show-config", action="store_true", help="print the resolved config and exit")

    u = sub.add_parser("suite", help="run a grid of configurations over seeds (YAML/TOML suite file)")
    u.add_argument("suite_file", metavar="FILE", help="suite file: name, base, grid, seeds (see simulations/suites/)")
    u.add_argument("--dry-run", action="store_true", help="print the runs it would do and write nothing")
    u.add_argument("--resume", action="store_true", help="skip finished runs, re-run failed or unfinished ones")
    u.add_argument("--runs-dir", default=None, help="folder of the suite's run directories (default runs/suite-<name>)")
    u.add_argument("--no-report", action="store_true", help="do not write the report at the end")

    r = sub.add_parser("report", help="tables and plots of a suite, from its run directories")
    r.add_argument("directory", metavar="DIR", help="the suite's folder (runs/suite-<name>)")
    r.add_argument("--out", default=None, help="where to write the report (default DIR)")
    r.add_argument("--no-latency", action="store_true", help="do not measure the split latency from the bundles")

    n = sub.add_parser("node", help="a warm worker beside a SuperNode: keeps torch and the data loaded between messages")
    n.add_argument("--socket", required=True, help="Unix socket path (its folder must be closed to other users); give "
                   "the SuperNode the same path as node config worker-socket")
    n.add_argument("--threads", type=int, default=0, help="torch threads for the handlers (default 0: every CPU this "
                   "process may use, after taskset and a container's CPU quota); 1 where several nodes share one machine's cores (a loopback test)")

    # torch-free modules (export_cli imports torch only inside run_export)
    from .deploy.deploy_cli import add_deploy_parser
    from .deploy.doctor import add_doctor_parser
    from .deploy.edge_cli import add_bench_parser, add_infer_parser
    from .deploy.export_cli import add_export_parser

    add_export_parser(sub)
    add_infer_parser(sub)
    add_bench_parser(sub)
    add_deploy_parser(sub)
    add_doctor_parser(sub)
    parser.commands = sub.choices  # name -> its parser: an unknown option is reported with its command's help
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def cmd_train(args) -> int:
    from .simulations.train_cli import run_train

    return run_train(args)


def cmd_prune(args) -> int:
    from .simulations.centralised_cli import run_prune

    return run_prune(args)


def cmd_groups(args) -> int:
    from .simulations.centralised_cli import run_groups

    return run_groups(args)


def resolve_run_config(args):
    """Defaults (with --resume, the run directory's saved config) <- --config file <- --set overrides <- --run-dir;
    then dataset and image shape from the base checkpoint. So `--run-dir R --resume` alone continues R as it was started."""
    from pathlib import Path

    from .shared.config import RunConfig

    def layered(cfg: RunConfig) -> RunConfig:
        if args.config:
            cfg = RunConfig.from_file(args.config, cfg)
        cfg = RunConfig.from_overrides(args.set, cfg)
        if args.run_dir is not None:  # an empty --run-dir is an error, not the default
            cfg = RunConfig.from_mapping({"run-dir": args.run_dir}, cfg)
        return cfg

    cfg = layered(RunConfig())
    if getattr(args, "resume", False) and (Path(cfg.run_dir) / "config.json").is_file():
        from .server.run_directory import RunDirectory

        saved = RunDirectory(cfg.run_dir).saved_settings()
        saved.pop("stop-after", None)  # where the first command stopped is not where this one should
        cfg = layered(RunConfig.from_mapping(saved, source=str(Path(cfg.run_dir) / "config.json")))
    from .shared.checkpoint import resolve_run_inputs

    return resolve_run_inputs(cfg)


def cmd_simulate(args) -> int:
    cfg = resolve_run_config(args)
    if args.show_config:
        for k, v in cfg.to_flower().items():
            print(f"{k} = {json.dumps(v)}")
        return 0
    from .simulations.simulate import simulate

    print(f"papm simulate: {cfg.dataset}, {cfg.nodes} nodes, K={cfg.devices} devices, budget {cfg.budget:g} -> {cfg.run_dir}")
    run_dir = simulate(cfg, resume=args.resume, force=args.force)
    summary = run_dir / "summary.md"
    if summary.exists() and not cfg.stop_after:
        print(summary.read_text())
    report = run_dir / "groups" / "report.html"
    print(f"run directory: {run_dir}" + (f"  (group report: {report})" if report.exists() else ""))
    return 0


def cmd_suite(args) -> int:
    from .simulations.suite import dry_run_table, plan_suite, run_suite

    suite = plan_suite(args.suite_file, args.runs_dir)
    print(dry_run_table(suite))
    if args.dry_run:
        return 0
    record = run_suite(suite, resume=args.resume)
    failed = [n for n, e in record["runs"].items() if e.get("status") == "failed"]
    if not args.no_report and len(failed) < len(suite.runs):
        from .deploy.suite_report import write_report

        paths = write_report(suite.root)
        print(f"report: {paths['summary_all.md']} and {paths['summary_all.csv']}")
    print(f"suite {suite.name}: {len(suite.runs) - len(failed)} runs finished, {len(failed)} failed (see {suite.root / 'suite.json'})")
    return 0 if not failed else 1


def cmd_report(args) -> int:
    from .deploy.suite_report import write_report

    paths = write_report(args.directory, args.out, measure_latency=not args.no_latency)
    for name, path in paths.items():
        print(f"wrote {path}")
    return 0


def cmd_export(args) -> int:
    from .deploy.export_cli import run_export

    return run_export(args)


def cmd_infer(args) -> int:
    from .deploy.edge_cli import run_infer

    return run_infer(args)


def cmd_bench(args) -> int:
    from .deploy.edge_bench import run_bench

    return run_bench(args)


def cmd_deploy(args) -> int:
    from .deploy.deploy_cli import run_deploy

    return run_deploy(args)


def cmd_doctor(args) -> int:
    from .deploy.doctor import run_doctor

    return run_doctor(args)


def cmd_node(args) -> int:
    import signal
    import threading

    from .client.worker import serve
    from .shared.errors import PapmError

    if args.threads < 0:
        raise PapmError(f"--threads must be >= 0 (0: all cores), got {args.threads}; pass e.g. --threads 1")
    import torch

    from .shared.cpu import fit_torch_threads

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = f" (torch threads: {torch.get_num_threads() if args.threads else fit_torch_threads()})"
    stop, ready = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # systemd / the kit's supervisor stop it this way
    thread = threading.Thread(target=lambda: ready.wait() and print(f"papm node: serving on {args.socket}{threads}", flush=True),
                              daemon=True)
    thread.start()
    try:
        serve(args.socket, ready=ready, stop=stop)
    except KeyboardInterrupt:
        pass
    print("papm node: stopped", flush=True)
    return 0


COMMANDS = {"node": cmd_node, "suite": cmd_suite, "report": cmd_report, "doctor": cmd_doctor, "train": cmd_train, "prune": cmd_prune, "groups": cmd_groups, "simulate": cmd_simulate,
            "export": cmd_export, "infer": cmd_infer, "bench": cmd_bench,
            "deploy": cmd_deploy}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # one line that points at `papm <command> --help`, not the top level's
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    from .shared.errors import PapmError

    try:
        return COMMANDS[args.command](args)
    except PapmError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; finished outputs are kept, unfinished ones were not written", file=sys.stderr)
        return 130
    except OSError as e:  # a path the checks could not foresee (a folder that vanished, a full disk, /proc)
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; check the path, its permissions and the free space, then run again",
              file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # a role's package missing from this install (an edge install running train)
        package = (e.name or "").split(".")[0]
        if not package or package == __package__:
            raise  # papm's own module: a broken install or a bug, not a missing role
        print(f"error: `papm {args.command}` needs the Python package {package!r}, which this install lacks; "
              "`papm doctor` names the role that brings it and the pip command that installs it", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
