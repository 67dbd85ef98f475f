"""The benchmark scripts that take the real SmolLM2 run end to end at tiny sizes, on the test fixtures' text: a
change of the library's API breaks them here, not hours into a measurement."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"


def test_chat_benchmark_runs_tiny(bench, tmp_path):
    out = tmp_path / "chat.md"
    assert bench("chat").main(["--prompts", "2", "--num-samples", "2", "--seq-len", "32", "--levels", "2:4",
                               "--calibrations", "chat", "--max-new-tokens", "4", "--output", str(out)]) == 0
    table = out.read_text()
    assert "| dense | - |" in table and "| d2prune 2:4 | self, chat template |" in table


def test_structured_benchmark_runs_tiny(bench, tmp_path):
    out = tmp_path / "structured.md"
    argv = ["--calibration", str(FIXTURES / "pruning_notes.jsonl"), "--eval", str(FIXTURES / "pruning_notes.txt"),
            "--num-samples", "2", "--seq-len", "32", "--eval-windows", "1", "--splits", "bench", "--modes", "blocks",
            "--ratios", "0.1", "--methods", "block_influence", "--no-unstructured", "--zero-shot",
            "--speed-runs", "1", "--prefill-tokens", "8", "--decode-tokens", "1", "--decode-batches", "1",
            "--dtypes", "float32", "--rows", str(tmp_path / "rows.json"), "--output", str(out),
            "--work-dir", str(tmp_path / "work")]
    assert bench("structured").main(argv) == 0
    table = out.read_text()
    assert "| blocks | 0.1" in table and "block_influence" in table and "| blocks 0.1" in table
