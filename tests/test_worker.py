"""The warm node worker (`papm node`): the ClientApp Flower starts imports no torch and hands each message
to the worker over a Unix socket; the results are the in-process ones; a missing worker falls back."""

import json
import os
import subprocess
import sys

import pytest

from papm.client.client_app import app as handlers
from papm.client.entry import MESSAGE_TYPES
from papm.client.entry import app as entry
from papm.shared.config import RunConfig
from papm.simulations.direct import run_direct

from conftest import run_papm

SMALL = ["nodes=2", "devices=2", "base-rounds=1", "base-epochs=1", "finetune-epochs=1", "finetune-rounds=1",
         "fusion-rounds=1", "device=cpu"]


def test_the_entry_clientapp_routes_every_message_type_the_handlers_know():
    assert set(MESSAGE_TYPES) == set(handlers._registered_funcs)
    r = subprocess.run([sys.executable, "-c", "import sys, papm.client.entry; print('torch' in sys.modules)"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr  # the per-message process stays light


@pytest.fixture
def worker(tmp_path):
    folder = tmp_path / "w"
    folder.mkdir(mode=0o700)
    sock = folder / "node.sock"
    proc = subprocess.Popen([sys.executable, "-m", "papm.cli", "node", "--socket", str(sock)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    assert proc.stdout.readline().startswith("papm node: serving on"), proc.stdout.read()
    yield sock, proc
    proc.terminate()
    proc.wait(timeout=30)


def _run(run_dir, node_configs=None, app=None):
    run_direct(RunConfig.from_overrides([*SMALL, f"run-dir={run_dir}"]), node_configs=node_configs, app=app)
    return json.loads((run_dir / "evaluation.json").read_text())


def test_a_run_through_the_worker_ends_where_an_in_process_run_does(tmp_path, worker):
    sock, proc = worker
    # node 0 has a worker; node 1's socket leads nowhere: it falls back to running the handlers itself
    configs = [{"partition-id": 0, "num-partitions": 2, "worker-socket": str(sock)},
               {"partition-id": 1, "num-partitions": 2, "worker-socket": str(tmp_path / "w" / "none.sock")}]
    a = _run(tmp_path / "warm", configs, entry)
    b = _run(tmp_path / "plain")
    assert (a["base"]["accuracy"], a["fusion"]["accuracy"]) == (b["base"]["accuracy"], b["fusion"]["accuracy"])
    assert a["fusion"]["per_class"] == b["fusion"]["per_class"]
    proc.terminate()
    out = proc.communicate(timeout=30)[0]
    answered = [line for line in out.splitlines() if "answered in" in line]
    assert any("train.finetune" in line for line in answered) and any("query.hello" in line for line in answered)
    assert not sock.exists()  # the worker removes its socket when it stops


def test_a_handler_error_in_the_worker_is_raised_by_the_clientapp(tmp_path, worker, caplog):
    """A node whose data root does not exist fails in its handler inside the worker; its one line comes back as the
    node's error reply, so the server reports the node's own reason (and the run stops: no node is left)."""
    sock, proc = worker
    coordinator = tmp_path / "coordinator"
    from conftest import write_pattern_folder

    write_pattern_folder(coordinator, per_class=4, size=16, parts=("test",))
    configs = [{"partition-id": i, "num-partitions": 2, "worker-socket": str(sock), "data-root": str(tmp_path / "nowhere")}
               for i in range(2)]
    with pytest.raises(Exception, match="every node failed"):
        run_direct(RunConfig.from_overrides([*SMALL, "dataset=imagefolder", f"data-root={coordinator}",
                                             f"run-dir={tmp_path / 'bad'}"]), node_configs=configs, app=entry)
    assert any("error 2: " in r.getMessage() and "nowhere" in r.getMessage() for r in caplog.records)
    proc.terminate()
    assert "papm node: query.hello failed: " in proc.communicate(timeout=30)[0]


def test_a_nodes_bad_data_comes_back_as_its_one_line(tmp_path):
    """In-process (simulation) too: a handler's PapmError is the node's error reply, code 2 as Flower's own, with the
    one line that says what to fix, not an exception for Flower and Ray to print as tracebacks."""
    from conftest import write_pattern_folder
    from papm.shared.errors import PapmError

    coordinator = tmp_path / "coordinator"
    write_pattern_folder(coordinator, per_class=4, size=16, parts=("test",))
    configs = [{"partition-id": i, "num-partitions": 2, "data-root": str(tmp_path / "nowhere")} for i in range(2)]
    with pytest.raises(PapmError, match="every node failed") as e:
        run_direct(RunConfig.from_overrides([*SMALL, "dataset=imagefolder", f"data-root={coordinator}",
                                             f"run-dir={tmp_path / 'bad'}"]), node_configs=configs, app=handlers)
    assert "(error 2: " in str(e.value) and "nowhere" in str(e.value) and "Traceback" not in str(e.value)


def test_papm_node_refuses_a_socket_folder_open_to_other_users(tmp_path):
    folder = tmp_path / "open"
    folder.mkdir()
    os.chmod(folder, 0o755)
    r = run_papm("node", "--socket", str(folder / "s.sock"), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "open to other users" in r.stderr and "chmod 700" in r.stderr


def test_papm_node_never_replaces_a_file_that_is_not_its_socket(tmp_path):
    folder = tmp_path / "private"
    folder.mkdir(mode=0o700)
    notes = folder / "notes.txt"
    notes.write_text("mine")
    r = run_papm("node", "--socket", str(notes), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "exists and is not a socket" in r.stderr and notes.read_text() == "mine"


def test_papm_node_threads_is_checked_and_sets_torch_threads(tmp_path):
    r = run_papm("node", "--socket", str(tmp_path / "s.sock"), "--threads", "-1", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: --threads must be >= 0 (0: all cores), got -1; "
                                                                    "pass e.g. --threads 1"]
    assert not (tmp_path / "s.sock").exists()
    folder = tmp_path / "w"
    folder.mkdir(mode=0o700)
    sock = folder / "node.sock"
    proc = subprocess.Popen([sys.executable, "-m", "papm.cli", "node", "--socket", str(sock), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        assert proc.stdout.readline().strip() == f"papm node: serving on {sock} (torch threads: 1)", proc.stdout.read()
        assert oct(sock.stat().st_mode & 0o777) == oct(0o600)  # the owner's only, without touching the umask
    finally:
        proc.terminate()
        proc.wait(timeout=30)
