"""The README's "Measure your own generator" examples, run as written (the callable and the script)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from un0_bench.harness.running.results import ResultStore

from un0_bench.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(tag: str) -> str:
    match = re.search(rf"<!-- readme-example: {tag} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no example tagged {tag}"
    return match.group(1)


def test_the_api_example_runs_and_its_folder_is_reported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = readme_block("api")
    # Protocol shortened for the test (one fewer window, no 2 s minimum); the example is otherwise as written.
    code = code.replace('meters="proxy,wall")', 'meters="proxy,wall", min_repeats=2, min_duration_s=0)')
    scope: dict = {}
    exec(compile(code, "README example", "exec"), scope)
    result = scope["result"]
    # Per image: 3 x (Linear 16->64: 2*16*64 = 2048, ReLU 64, Linear 64->64: 2*64*64 = 8192), sigmoid 64.
    assert result.flops_per_image == 3 * (2048 + 64 + 8192) + 64
    assert set(result.phase_energy_j) == {"denoise", "decode"}
    assert {r["meter"] for r in ResultStore(tmp_path / "runs" / "mine").load()} == {"proxy", "wall"}
    assert main(["report", "runs/mine"]) == 0


def test_the_script_example_runs_under_un0_bench_run(tmp_path):
    script = tmp_path / "gen.py"
    script.write_text(readme_block("script"))
    out = tmp_path / "cmd"
    done = subprocess.run([sys.executable, "-m", "un0_bench.cli", "run", "--out", str(out), "--images", "2",
                           "--meters", "wall", "--min-repeats", "2", "--min-duration", "0", "--idle", "0", "--",
                           sys.executable, str(script), "{out}", "{n}", "{seed}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "quality: FID" in done.stdout
    records = ResultStore(out).load()
    assert [(r["model"], r["meter"], r["quality"]["samples"]) for r in records] == [("command", "wall", 2)]
