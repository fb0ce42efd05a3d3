"""`make bench` runs three scripts; each runs here in a quick mode, so the benchmarks do not rot.
(The timings themselves are not tested: speed goes in benchmarks, never in tests.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def _bench(script: str, *args: str, timeout: int = 300):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_make_bench_scripts_run_in_quick_mode(tmp_path):
    assert "bench_ddp.py" in (ROOT / "Makefile").read_text()
    result = _bench("bench_data.py", "--sources", "cifar10", "--workers", "0", "--seconds", "0.2")
    assert result.returncode == 0, result.stderr[-3000:]
    result = _bench(
        "bench_fid.py", "--experiments", "cifar10", "--device", "cpu", "--batch-size", "2", "--seconds", "0.2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "ddp.json"
    # one process per strategy keeps it quick; `make bench` runs two
    result = _bench(
        "bench_ddp.py",
        "--processes",
        "1",
        "--iterations",
        "4",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--output",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads(out.read_text())["results"]
    assert set(table) == {"ddp", "ddp_find_unused_parameters_true"}
    assert all(row["it_per_s"] > 0 for row in table.values())


def test_bench_train_writes_the_table_against_the_baseline(tmp_path):
    assert "bench_train.py" in (ROOT / "Makefile").read_text()
    out = tmp_path / "latest.json"
    result = _bench(
        "bench_train.py",
        "--configs",
        "quickstart",
        "--ablate",
        "quickstart",
        "--repeats",
        "1",
        "--iterations",
        "2",
        "--side-by-side",
        "0",
        "--output",
        str(out),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(out.read_text())["configs"]["quickstart"]
    for key in ("iterations_per_s", "baseline_iterations_per_s", "speedup", "peak_memory_mb"):
        assert row[key] > 0, key
    assert row["speedup"] == row["iterations_per_s"] / row["baseline_iterations_per_s"]
    assert row["baseline_peak_memory_mb"] > 0 and row["batch"] == 64 and "CPU" in row["device"]
    assert {"channels_last", "lazy_augment", "joint_d_pass", "foreach_ema"} <= set(row["options"])
    assert row["bf16"]["iterations_per_s"] > 0
    # the FLOP count: the quickstart's networks at 8x8, three generator and about three critic passes
    assert 1e9 < row["flops_per_iteration"] < 1e11
    assert "baseline" in result.stdout and "speedup" in result.stdout
