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
