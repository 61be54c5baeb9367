"""Every benchmark script runs (tiny sizes, one repeat): these check nothing about speed."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


def run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def test_compare_train_smoke(tmp_path):
    out = run("benchmarks/compare_train.py", "--smoke", "--threads", "1", "--json", str(tmp_path / "r.json"))
    assert "speed-up (peer / ours)" in out and "CPU efficiency ours" in out and "peak memory" in out
    assert (tmp_path / "r.json").is_file()


def test_compare_generate_smoke():
    out = run("benchmarks/compare_generate.py", "--smoke", "--threads", "1")
    assert out.count("ours (cache) / peer") == 2 and "KV cache / no cache" in out and "time to first token" in out


def test_gpu_full_step_smoke():
    out = run("benchmarks/gpu_full_step.py", "--smoke")
    assert "inference" in out and out.count("train stage") == 2


@pytest.mark.parametrize("script", ["benchmarks/memory_plan.py"])
def test_memory_plan_script(script):
    out = run(script, "--stage", "4")
    assert "| 4 | 448 |" in out and "fp16 inference" in out


def test_course_reading_script(tmp_path):
    out = run("benchmarks/course_reading.py", "--course", str(tmp_path), "--scenes", "3", "--threads", "1")
    assert "no finished stage" in out and "| Phi + seeing projection (no course stage) |" in out
    row = next(line for line in out.splitlines() if line.startswith("| Phi + seeing"))
    split = [int(v) for v in row.split("|")[-3].split("/")]
    assert sum(split) == 3  # every refer answer falls into exactly one outcome
