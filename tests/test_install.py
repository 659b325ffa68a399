"""Installs per role: a SuperNode's install (no Ray, matplotlib, scipy, scikit-learn or tomli-w) runs the
ClientApp's handlers; `papm doctor` names what a role misses and the command that fixes it."""

import subprocess
import sys
import textwrap

from papm.deploy import doctor

from conftest import write_pattern_folder

NODE_ONLY = textwrap.dedent("""
    import sys
    for name in ("ray", "matplotlib", "scipy", "sklearn", "tomli_w"):  # what the node extra leaves out
        sys.modules[name] = None
    import json
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from papm.client.client_app import app
    from papm.client.records import json_config, message_content, record_state, state_record
    from papm.shared.config import RunConfig
    from papm.shared.models import build_model, model_args

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 7
    cfg = RunConfig.from_overrides(["dataset=imagefolder", "data-root=unused", "image-size=24", "channels=3",
                                    "base-epochs=1", "min-partition-size=4", "device=cpu"])
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 1, "data-root": sys.argv[1]},
                  state=RecordDict(), run_config={})

    def send(message_type, papm, **arrays):
        content = message_content(cfg, papm=json_config(**papm))
        for k, v in arrays.items():
            content[k] = v
        msg = Message(content, 7, message_type, group_id="t")
        msg.metadata.__dict__["_message_id"] = "m-" + message_type
        msg.metadata.__dict__["_run_id"] = 1
        reply = app(msg, ctx)
        assert not reply.has_error(), reply.error
        return reply.content

    hello = send("query.hello", {})
    info = {"name": "imagefolder", "class_names": json.loads(hello["node"]["class_names"]), "in_channels": 3,
            "image_size": 24, "mean": [0.3] * 3, "std": [0.2] * 3, "hflip": True, "crop_padding": 3}
    args = model_args(3, 3, 0.125)
    model = build_model(args)
    trained = send("train.base", {"model-args": args, "data-info": info, "round": 0}, model=state_record(model.state_dict()))
    stats = send("query.class_stats", {"model-args": args, "data-info": info}, model=trained["model"])
    apoz = send("query.apoz", {"model-args": args, "data-info": info, "jobs": [{"key": "group-0", "classes": [0, 1]}]},
                model=trained["model"])
    assert int(hello["metrics"]["num-examples"]) > 0 and "counts-group-0" in apoz and "stats" in stats
    blocked = [m for m in ("ray", "matplotlib", "scipy", "sklearn") if sys.modules.get(m) is not None]
    print("ok", blocked)
""")


def test_a_node_only_install_runs_the_clientapp(tmp_path):
    tree = write_pattern_folder(tmp_path / "device", per_class=8, size=32, parts=("train",))
    r = subprocess.run([sys.executable, "-c", NODE_ONLY, str(tree)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "ok []"


def _uninstall(monkeypatch, package: str) -> None:
    """Make importlib.metadata report ``package`` as not installed (for doctor's checks)."""
    real = doctor.metadata.version

    def version(name):
        if name.lower() == package:
            raise doctor.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(doctor.metadata, "version", version)


def test_doctor_names_a_missing_package_and_its_fix(monkeypatch):
    _uninstall(monkeypatch, "scipy")
    text, ok = doctor.report("coordinator")
    assert not ok
    lines = text.splitlines()
    assert any(ln.startswith("coordinator") and "missing" in ln for ln in lines)
    assert any("scipy" in ln and "(missing)" in ln for ln in lines)
    assert any(ln.startswith("node") and "ready" in ln for ln in lines)
    assert 'pip install "papm-fl[coordinator]"' in text
    text, ok = doctor.report("node")  # the node role does not need scipy
    assert ok


def test_doctor_checks_the_extras_a_requirement_names(monkeypatch):
    """flwr is installed but Ray (its [simulation] extra) is not: the coordinator is not ready."""
    _uninstall(monkeypatch, "ray")
    assert doctor.check("flwr>=1.41") is None
    assert doctor.check("flwr[simulation]>=1.41") == "its [simulation] extra lacks ray"
    text, ok = doctor.report("coordinator")
    assert not ok and "lacks ray" in text


def test_doctor_exit_code_follows_the_named_role():
    r = subprocess.run([sys.executable, "-m", "papm.cli", "doctor", "--role", "coordinator"], capture_output=True, text=True)
    assert r.returncode == 0 and "coordinator  ready" in r.stdout and "CPU:" in r.stdout, r.stdout + r.stderr
