"""benchmarks/gpu.py: its CPU parts (`--dry-run`) run and print the table and the AMP run's verdict."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_dry_run(capsys):
    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    gpu.main(["--dry-run"])
    out = capsys.readouterr().out
    for name in ("tood-r50", "tood-n"):  # each model once, with a measured training rate and fp32 latency
        row = re.search(rf"^\| {name} \| 2 \| 64x64 \| ([\d.]+) \| - \| - \| - \| - \| ([\d.]+) \| - \|$", out, re.M)
        assert row and float(row[1]) > 0 and float(row[2]) > 0, out
    row = re.search(r"^\| tood-r50 \| 2 \| ([\d.]+) \| - \| 4\.1 \|$", out, re.M)  # yolo train, recipe mmdet
    assert row and float(row[1]) > 0 and "keep-ratio 128x77" in out and "2 iterations" in out, out
    assert "AMP run: tood-n, 2 iterations" in out and "AMP off" in out and "all finite: PASS" in out
