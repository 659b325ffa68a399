"""`papm bench` compares the split with the unsplit base at fp32 and at INT8 (a user could quantise the base
too) and says which CPU and ONNX Runtime measured it."""

import csv

import pytest

from conftest import run_papm
from test_export import exported_bundle


@pytest.fixture(scope="session")
def exported(tmp_path_factory, digits, base_ckpt):
    return exported_bundle(tmp_path_factory, digits, base_ckpt)


def test_bench_table_has_both_ratios_and_the_machine(exported, tmp_path):
    _, bundle, _, _ = exported
    r = run_papm("bench", bundle, "--runs", "5", "--warmup", "1", "--out", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    base = {row["precision"]: float(row["lat1_ms"]) for row in rows if row["model"] == "base (unsplit)"}
    assert set(base) == {"fp32", "int8"}
    for row in rows:
        lat = float(row["lat1_ms"])
        assert float(row["lat_vs_base_fp32"]) == pytest.approx(lat / base["fp32"], rel=1e-6)
        assert float(row["lat_vs_base_int8"]) == pytest.approx(lat / base["int8"], rel=1e-6)
    md = (tmp_path / "bench.md").read_text()
    assert "latency vs base fp32" in md and "latency vs base INT8" in md
    assert "onnxruntime" in md and ("AVX" in md or "dot-product" in md or "no integer" in md)
