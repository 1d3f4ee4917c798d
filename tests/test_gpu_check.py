"""benchmarks/gpu_check.py --dry-run: every stage runs at tiny size on CPU, so the GPU command is known to run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path


def test_gpu_check_dry_run_runs_every_stage(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = module.main(["--dry-run", "--out", str(tmp_path)])
    for stage in ("calibrate", "max_tokens", "throughput", "kernels", "vae"):
        assert "error" not in summary[stage], (stage, summary[stage].get("traceback"))
    rows = summary["max_tokens"]["rows"]
    assert [r["policy"] for r in rows] == ["plain", "checkpointing", "ckpt+offload", "nested+offload+mlp_chunks"]
    assert all(r["frames"] > 0 for r in rows) and rows[3]["frames"] >= rows[0]["frames"]
    assert all(r["offload_over_block_throughput"] > 0 for r in summary["throughput"]["rows"])
    saved = json.loads((tmp_path / "dry_run" / "summary.json").read_text())
    assert set(saved) >= {"calibrate", "max_tokens", "throughput", "kernels", "vae", "seconds"}
