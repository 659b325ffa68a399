"""Bad input a user can give: one line `error: <problem>; <fix>`, exit code 2, no traceback, nothing written."""

import json
import shutil

import pytest

from conftest import run_papm
from test_export import exported_bundle


@pytest.fixture(scope="session")
def exported(tmp_path_factory, digits, base_ckpt):
    return exported_bundle(tmp_path_factory, digits, base_ckpt)


def one_error(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("args,needle", [
    (["train", "--dataset", "digits", "--lr", "inf"], "finite number"),
    (["train", "--dataset", "digits", "--lr", "nan"], "finite number"),
    (["train", "--dataset", "digits", "--width", "0"], "--width must be in (0, 16]"),
    (["train", "--dataset", "digits", "--weight-decay", "-1"], "weight decay"),
    (["train", "--dataset", "digits", "--image-size", "4"], "image size must be in [8, 512]"),
    (["simulate", "--set", "base-lr=inf"], "finite number"),
    (["simulate", "--set", "width=1e9"], "width must be in (0, 16]"),
    (["simulate", "--set", "image-size=1000"], "image-size must be in [8, 512]"),
    (["simulate", "--set", "dataset=imagefolder", "--set", "data-root=/nonexistent/photos"], "not a folder"),
    (["deploy", "init", "KIT", "--superlink", "h:99999"], "port must be 1-65535"),
    (["deploy", "init", "KIT", "--hosts", "bad host"], "not a host name"),
    (["deploy", "init", "KIT", "--hosts", "héllo.example"], "not a host name"),
    (["deploy", "init", "KIT", "--data-root-template", '/d/n{id}" --x=1'], "must not contain"),
])
def test_bad_arguments_are_one_line(tmp_path, args, needle):
    args = [str(tmp_path / "kit") if a == "KIT" else a for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    line = one_error(run_papm(*args, "--flwr-home", tmp_path / "fh") if args[0] == "deploy" else
                     run_papm(*args, cwd=tmp_path))
    assert needle in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_config_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "my.toml"
    bad.write_bytes(b"devices = 3\nname = \"\xff\xfe\"\n")
    assert "not UTF-8" in one_error(run_papm("simulate", "--config", bad, cwd=tmp_path))


def test_kit_folder_that_is_a_file(tmp_path):
    (tmp_path / "kit").write_text("not a folder")
    assert "is a file" in one_error(run_papm("deploy", "init", tmp_path / "kit", "--flwr-home", tmp_path / "fh"))


@pytest.mark.parametrize("field,value,needle", [
    ("parts", "not a list", "parts must be a non-empty list"),
    ("class_names", [1, 2], "class_names"),
    ("input", {"channels": "3", "image_size": 8}, "input.channels"),
    ("head", {"feature_size": 10, "input_name": "features", "files": {}}, "head.files"),
])
def test_manifest_with_wrongly_typed_fields(tmp_path, field, value, needle, exported):
    bundle = tmp_path / "bundle"
    shutil.copytree(exported[1], bundle)
    (bundle / "manifest.sig").unlink(missing_ok=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest[field] = value
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    png = tmp_path / "x.png"
    from PIL import Image

    Image.new("L", (8, 8)).save(png)
    assert needle in one_error(run_papm("infer", bundle, png))
