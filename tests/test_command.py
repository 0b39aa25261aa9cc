"""``un0-bench run -- CMD``: an external command that writes PNGs, measured from outside."""

from __future__ import annotations

import json
import sys

import pytest
from un0_bench.harness.running.results import ResultStore

from un0_bench.cli import main

# The README's example script: N grayscale 8x8 PNGs (image k a digit-like blob) into the folder it is given.
SCRIPT = '''
import sys
from pathlib import Path
import numpy as np
from PIL import Image
out, n, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(seed)
for k in range(n):
    Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8), mode="L").save(out / f"{k:04d}.png")
'''
FAST = ["--min-repeats", "2", "--min-duration", "0", "--warmup", "1", "--idle", "0"]


def run(tmp_path, *cmd, images="2", meters="wall"):
    return main(["run", "--out", str(tmp_path / "out"), "--images", images, "--meters", meters, *FAST, "--", *cmd])


def test_command_is_measured_and_judged_and_readable_by_report(tmp_path, capsys):
    script = tmp_path / "gen.py"
    script.write_text(SCRIPT)
    assert run(tmp_path, sys.executable, str(script), "{out}", "{n}", "{seed}", images="4") == 0
    records = ResultStore(tmp_path / "out").load()
    assert [(r["model"], r["backbone"], r["meter"], r["status"]) for r in records] == [
        ("command", "command", "wall", "ok")]
    record = records[0]
    # Two windows, each one run of the command writing 4 images.
    assert [w["images"] for w in record["windows"]] == [4, 4]
    assert record["duration_s_per_image"] > 0
    assert record["config"]["generator"]["command"][-3:] == ["{out}", "{n}", "{seed}"]
    # The work ran in another process: unknown, with the reason, not 0 (the PNG loading here is not the work).
    assert (record["flops_per_image"], record["bytes_per_image"], record["proxy_j_per_image_by_part"]) == (
        None, None, None)
    assert record["counts_missing_reason"].startswith("the command runs in another process")
    # 8x8 grayscale: judged by the digits judge on the 4 files the command wrote.
    assert record["quality"]["samples"] == 4
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == 4
    assert main(["report", str(tmp_path / "out")]) == 0
    assert "quality: FID" in capsys.readouterr().out


def test_environment_variables_tell_the_command_where(tmp_path):
    code = ("import os, numpy as np; from PIL import Image\n"
            "for k in range(int(os.environ['UN0_BENCH_IMAGES'])):\n"
            "    path = os.environ['UN0_BENCH_OUT'] + '/' + str(k) + '.png'\n"
            "    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)\n")
    assert run(tmp_path, sys.executable, "-c", code) == 0
    record = ResultStore(tmp_path / "out").load()[0]
    assert record["quality"] is None
    assert record["quality_note"] == ("not measured (the images are 3x4x4; the digits judge reads grayscale 8x8 or "
                                      "16x16 (image k showing digit k mod 10))")


@pytest.mark.parametrize(("cmd", "message"), [
    ([sys.executable, "-c", "import sys; print('loading'); sys.exit('CUDA out of memory')"],
     "the command exited with code 1: CUDA out of memory"),
    ([sys.executable, "-c", "pass"], "the command wrote no images to"),
    ([sys.executable, "-c", "from PIL import Image; import os; "
                            "Image.new('L', (8, 8)).save(os.environ['UN0_BENCH_OUT'] + '/0.png')"],
     "the command wrote 1 of 2 images to"),
    ([sys.executable, "{outt}"], "bad placeholder in the command ('outt')"),
])
def test_a_failing_command_is_one_line_and_leaves_no_record(tmp_path, capsys, cmd, message):
    assert run(tmp_path, *cmd) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"un0-bench: error: {message}") and "\n" not in err
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_proxy_cannot_measure_another_process(tmp_path, capsys):
    assert run(tmp_path, sys.executable, "-c", "pass", meters="wall,proxy") == 2
    assert "--meters proxy cannot measure a command" in capsys.readouterr().err
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == '["out"]' or not (tmp_path / "out").exists()
