"""`longctx needle` end to end on a tiny model: output files, resume, bad input."""

from __future__ import annotations

import json

import pytest

from longctx.cli import main
from longctx.eval.grid import grid_depths, linear_lengths, read_results

GRID = ["--lengths", "700,900", "--depths", "0,50,100", "--samples", "2", "--haystack", "essays"]


def run_needle(model, output, *extra):
    return main(["needle", "--model", str(model), *GRID, "--output", str(output), *extra])


def test_grid_writes_results_summary_and_heatmap(tiny_llama, tmp_path, capsys):
    output = tmp_path / "run"
    assert run_needle(tiny_llama, output, "--task", "multivalue", "--scoring", "teacher-forced") == 0
    rows = read_results(output / "results.jsonl")
    assert len(rows) == 2 * 3 * 2
    for row in rows:
        assert {"length", "depth", "task", "answer", "expected", "score", "seconds"} <= row.keys()
        assert 0.0 <= row["score"] <= 1.0 and row["task"] == "multivalue" and len(row["expected"]) == 4
    summary = json.loads((output / "summary.json").read_text())
    assert summary["samples_done"] == 12 and set(summary["per_length"]) == {"700", "900"}
    assert set(summary["per_depth"]) == {"0", "50", "100"}
    mean = sum(r["score"] for r in rows) / len(rows)
    assert summary["mean_score"] == pytest.approx(mean, abs=1e-4)
    assert summary["settings"]["task"] == "multivalue" and summary["model"] == "tiny-llama"
    png = (output / "heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    out = capsys.readouterr().out
    assert "depth %" in out and "effective length" in out


def test_resume_skips_finished_cells(tiny_llama, tmp_path):
    output = tmp_path / "run"
    assert run_needle(tiny_llama, output, "--scoring", "teacher-forced") == 0
    rows = (output / "results.jsonl").read_text().splitlines()
    # simulate an interruption: the last two samples are lost, one of them half-written
    (output / "results.jsonl").write_text("\n".join(rows[:-2]) + "\n" + rows[-2][:20])
    assert run_needle(tiny_llama, output, "--scoring", "teacher-forced", "--resume") == 0
    resumed = read_results(output / "results.jsonl")
    assert len(resumed) == len(rows)
    assert [json.loads(r)["score"] for r in rows] == [r["score"] for r in resumed]
    assert sorted((r["length"], r["depth"], r["sample"]) for r in resumed) == sorted(
        (json.loads(r)["length"], json.loads(r)["depth"], json.loads(r)["sample"]) for r in rows
    )
    before = (output / "results.jsonl").read_text()
    assert run_needle(tiny_llama, output, "--scoring", "teacher-forced", "--resume") == 0  # nothing left to do
    assert (output / "results.jsonl").read_text() == before


def test_refusals(tiny_llama, tmp_path, capsys):
    output = tmp_path / "run"
    assert run_needle(tiny_llama, output, "--scoring", "teacher-forced") == 0
    capsys.readouterr()
    assert run_needle(tiny_llama, output) == 2
    assert "already exists" in capsys.readouterr().err
    assert run_needle(tiny_llama, output, "--resume") == 2  # scoring differs
    assert "settings differ (scoring)" in capsys.readouterr().err
    assert main(["needle", "--model", str(tiny_llama), "--lengths", "700", "--depths", "0,120",
                 "--output", str(tmp_path / "x")]) == 2
    assert "outside 0-100" in capsys.readouterr().err
    assert main(["needle", "--model", str(tiny_llama), "--lengths", "1M", "--output", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "GiB" in err and "available" in err and not (tmp_path / "y" / "results.jsonl").exists()
    assert main(["needle", "--model", str(tiny_llama), "--output", str(tmp_path / "z")]) == 2
    assert "no lengths" in capsys.readouterr().err
    assert main(["needle", "--model", str(tiny_llama), "--lengths", "700", "--device", "gpu0",
                 "--output", str(tmp_path / "d")]) == 2
    assert "--device 'gpu0' is not a device" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_grid_spacing():
    assert linear_lengths(1000, 16000, 4) == [1000, 6000, 11000, 16000]
    assert grid_depths(5) == [0, 25, 50, 75, 100]
    sigmoid = grid_depths(11, "sigmoid")
    assert sigmoid[0] == 0 and sigmoid[-1] == 100 and len(sigmoid) == 11
    assert sigmoid[1] < 10 and sigmoid[-2] > 90  # denser near both ends
