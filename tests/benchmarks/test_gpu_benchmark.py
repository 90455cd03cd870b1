"""The GPU benchmark script runs where it cannot measure: its CPU dry run, and its fast failure."""

import json

import pytest
import torch

from benchmarks import gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_gpu_benchmark_stops_at_once_without_cuda(tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu.main(["--out", str(tmp_path / "gpu.json")])
    assert not (tmp_path / "gpu.json").exists()


def test_gpu_benchmark_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    gpu.main(["--dry-run", "--sections", "machine,syncs,term,compiled", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"machine", "syncs", "term", "compiled", "compiled_graphs", "total_seconds"} <= set(result)
    assert [(r["B"], r["D"]) for r in result["compiled"]] == [(r["B"], r["D"]) for r in result["term"]]
    assert all(r["eager_s"] > 0 and r["compiled_s"] > 0 for r in result["compiled"])
    assert result["compiled_graphs"]["unique_graphs"] <= len(result["compiled"])  # one compile per shape


def test_gpu_benchmark_names_the_sections_when_one_is_unknown(tmp_path):
    with pytest.raises(SystemExit, match="unknown section 'kernels'; the sections are machine, syncs"):
        gpu.main(["--dry-run", "--sections", "machine,kernels", "--out", str(tmp_path / "gpu.json")])


def test_gpu_benchmark_renders_a_cpu_row_without_the_cuda_only_columns():
    row = {
        "B": 90,
        "D": 128,
        "eager_s": 0.002,
        "eager_kernels": {"device_kernels": 0, "busy_ms": 0.0, "host_launch_calls": 0},
        "graph_kernels": {},
        "eager_peak_bytes": None,
    }
    line = gpu.render_term_row(row)
    assert line.split("|")[1].split() == ["2.000", "nan", "nan"]  # eager ms, no graph, no FrEIA
    assert len(line) == len(gpu.TERM_HEADER)  # columns line up under the header
