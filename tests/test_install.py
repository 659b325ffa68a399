"""Installs per role: a SuperNode's install (no Ray, matplotlib, scipy, scikit-learn or tomli-w) runs the
ClientApp's handlers; `papm doctor` names what a role misses and the command that fixes it."""

import os
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from papm.deploy import doctor
from papm.shared import cpu
from papm.shared.cpu import features_from

from conftest import write_pattern_folder

ROOT = Path(__file__).resolve().parents[1]

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


def _requirement_closure(name: str) -> list[metadata.Distribution]:
    """The installed distribution ``name`` and everything it requires, extras followed (torch's cuda-toolkit[...]
    is where its nvidia wheels come from)."""
    found, extras, todo = {}, {}, [Requirement(name)]
    while todo:
        req = todo.pop()
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # a requirement whose marker does not hold here
        key = canonicalize_name(dist.metadata["Name"])
        wanted = {""} | set(req.extras)
        if key in found and wanted <= extras[key]:
            continue
        found[key], extras[key] = dist, extras.get(key, set()) | wanted
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in wanted):
                todo.append(sub)
    return list(found.values())


def _preinstall_torch(venv: Path, where: Path) -> None:
    """Make this environment's torch (and what it requires) visible to ``venv`` through a .pth file, as a device
    whose image ships its own torch (a Jetson's) has it: a CUDA torch with its nvidia wheels is 5 GB, which a second
    copy per CI run does not have the disk for. The links sit outside the venv, so pip never uninstalls through them."""
    where.mkdir()
    for dist in _requirement_closure("torch"):
        if canonicalize_name(dist.metadata["Name"]) in ("pip", "setuptools"):  # the venv's own
            continue
        # (not __pycache__: the interpreter writes there, and it would write through the link into this venv)
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")} - {"__pycache__"}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (where / top).exists():
                (where / top).symlink_to(source)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "preinstalled-torch.pth").write_text(f"{where}\n")


@pytest.mark.slow
def test_a_real_node_install_has_no_coordinator_packages_and_runs_the_clientapp(tmp_path):
    """A fresh venv with the node extra and the constraints file, as a SuperNode with its own torch installs it:
    none of the coordinator's packages, and the handlers run."""
    venv = tmp_path / "node"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    _preinstall_torch(venv, tmp_path / "device-torch")
    # a copy of the sources: pip builds a wheel in the source folder, and a test writes nothing into the repository
    source = tmp_path / "papm-fl"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "*.egg-info",
                                                                  "__pycache__", ".pytest_cache"))
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"{source}[node]", "-c", str(ROOT / "constraints.txt")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    python = str(venv / "bin" / "python")
    # pip kept the device's torch rather than installing its own over it
    r = subprocess.run([python, "-c", "import torch; print(torch.__file__)"], capture_output=True, text=True, cwd=tmp_path)
    assert r.stdout.startswith(str(tmp_path / "device-torch")), r.stdout + r.stderr
    # (tomli-w comes with flwr itself, so a node has it too)
    r = subprocess.run([python, "-c", "import importlib.util as u; print([m for m in ('ray', 'matplotlib', 'scipy', "
                        "'sklearn') if u.find_spec(m)])"], capture_output=True, text=True, cwd=tmp_path)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
    tree = write_pattern_folder(tmp_path / "device", per_class=8, size=32, parts=("train",))
    r = subprocess.run([python, "-c", NODE_ONLY, str(tree)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "ok []"
    r = subprocess.run([str(venv / "bin" / "papm"), "doctor", "--role", "node"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "node         ready" in r.stdout, r.stdout + r.stderr


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
    fix = [ln for ln in lines if ln.startswith("fix for coordinator: pip install")]
    assert len(fix) == 1 and "[coordinator]" in fix[0] and "fix for node" not in text
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


def test_doctor_without_a_role_gives_a_fix_for_every_incomplete_role(monkeypatch):
    _uninstall(monkeypatch, "torch-pruning")  # needed by the node role, and so by the coordinator
    text, ok = doctor.report(None)
    assert ok  # no role named: nothing to fail
    fixes = [ln for ln in text.splitlines() if ln.startswith("fix for ")]
    assert [f.split(":")[0] for f in fixes] == ["fix for node", "fix for coordinator"]
    assert all("pip install" in f for f in fixes)
    assert doctor.report("all")[1] is False  # `all` is the coordinator's packages


def test_doctor_reports_a_torch_that_fails_to_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # installed (metadata says so) but `import torch` raises
    text, ok = doctor.report("edge")
    assert ok and "torch: installed but `import torch` fails (ModuleNotFoundError" in text


def test_the_bare_install_brings_no_torch_flower_or_scikit_learn():
    """The edge role is the bare install: its requirements are the torch-free runtime's, nothing more."""
    edge = {doctor.re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower() for r in doctor.role_requirements()["edge"]}
    assert edge == {"numpy", "onnxruntime", "pillow", "cryptography"}


def test_cpu_features_from_the_flags():
    arm = features_from("aarch64", {"fp", "asimd", "asimddp"})  # a Raspberry Pi 5 (Cortex-A76)
    assert arm["arm"] and arm["arm_dotprod"] and not arm["x86"] and "ARM dot-product" in arm["isa"]
    assert not features_from("aarch64", {"fp", "asimd"})["arm_dotprod"]  # a Raspberry Pi 4 (Cortex-A72)
    assert features_from("arm64", set(), system="Darwin")["arm_dotprod"]
    avx2 = features_from("x86_64", {"sse4_2", "avx2"})
    assert avx2["avx2"] and not avx2["vnni"] and not avx2["avx512"]
    assert features_from("x86_64", {"avx2", "avx512f", "avx512_vnni"})["vnni"]
    assert features_from("x86_64", {"avx2", "avx_vnni"})["vnni"]  # Alder Lake and later: VNNI without AVX-512


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_the_cgroup_cpu_quota_of_a_container(tmp_path):
    """docker --cpus / a Kubernetes limit, as the kernel shows it: cgroup v2 cpu.max along the process's cgroup path
    (the tightest wins), v1 cfs quota / period; no quota and no cgroup file system are None."""
    v2, proc = tmp_path / "v2", tmp_path / "proc-cgroup"
    _write(v2 / "cpu.max", "max 100000")
    _write(v2 / "kubepods" / "cpu.max", "max 100000")
    _write(v2 / "kubepods" / "pod1" / "cpu.max", "250000 100000")
    _write(proc, "0::/kubepods/pod1")
    assert cpu.cgroup_cpu_limit(v2, proc) == 2.5
    _write(v2 / "kubepods" / "cpu.max", "150000 100000")  # the parent's limit is tighter
    assert cpu.cgroup_cpu_limit(v2, proc) == 1.5
    _write(proc, "0::/")  # inside a container's own namespace the path is "/"
    assert cpu.cgroup_cpu_limit(v2, proc) is None

    v1 = tmp_path / "v1"
    _write(v1 / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "200000")
    _write(v1 / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000")
    _write(proc, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/")
    assert cpu.cgroup_cpu_limit(v1, proc) == 2.0
    _write(v1 / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "-1")  # v1's "no quota"
    assert cpu.cgroup_cpu_limit(v1, proc) is None
    assert cpu.cgroup_cpu_limit(tmp_path / "absent", tmp_path / "absent-proc") is None


def test_usable_cpus_are_the_affinity_mask_capped_by_the_quota(monkeypatch):
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    for quota, expected in ((None, 4), (2.5, 2), (0.3, 1), (16.0, 4)):
        monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda quota=quota: quota)
        assert cpu.usable_cpus() == expected


def test_a_restricted_process_sizes_onnx_runtime_and_torch_to_its_cpus():
    """Pinned to one CPU (taskset, docker --cpuset-cpus), ONNX Runtime's pool and torch's threads are one thread, not
    the host's cores (ORT ignores the mask, torch a cgroup quota); an unpinned process keeps ORT's own default."""
    pytest.importorskip("onnxruntime")
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs a Linux process allowed on at least 2 CPUs")
    code = textwrap.dedent("""
        import os, sys
        from onnx import TensorProto, helper
        from papm.deploy.runtime import make_session
        from papm.shared import cpu
        g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        model = helper.make_model(g).SerializeToString()
        free = make_session(model).get_session_options().intra_op_num_threads
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        pinned = make_session(model).get_session_options().intra_op_num_threads
        cpu.cgroup_cpu_limit = lambda: 1.0  # a quota torch cannot see: torch keeps its threads until told
        import torch
        torch.set_num_threads(2)
        print(free, pinned, cpu.usable_cpus(), cpu.fit_torch_threads())
    """)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["0", "1", "1", "1"]


def test_a_missing_role_package_is_one_error_line(tmp_path):
    """An edge install running a torch command: one line that points at papm doctor, exit 2."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from papm.cli import main\n"
            "sys.exit(main(['train', '--dataset', 'digits', '--out', sys.argv[1]]))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "base.pt")], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: `papm train` needs the Python package 'torch'")
    assert "papm doctor" in lines[0] and not (tmp_path / "base.pt").exists()
