"""`ligerzoo plot DIR` (ligerzoo/cli.py): a PNG of the loss and tokens/s of DIR/metrics.jsonl, the
last record for a step written twice (a resumed run), and clear errors for bad input."""

import json
import sys

import pytest

from ligerzoo.cli import main
from ligerzoo.training.metrics import read_metrics as load_metrics

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def record(step: int, loss: float, tokens_per_s: float = 1000.0) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": tokens_per_s,
            "mfu": None, "peak_memory_gib": None}


def write_metrics(directory, records_or_lines) -> None:
    lines = [item if isinstance(item, str) else json.dumps(item) for item in records_or_lines]
    (directory / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5000


def test_plot_writes_a_png_next_to_the_metrics_and_prints_its_path(tmp_path, capsys):
    write_metrics(tmp_path, [record(step, 5.0 / step, 900.0 + step) for step in range(1, 21)])
    assert main(["plot", str(tmp_path)]) == 0
    out = tmp_path / "metrics.png"
    assert capsys.readouterr().out.strip() == str(out)
    assert_png(out)


def test_plot_out_chooses_the_path(tmp_path, capsys):
    write_metrics(tmp_path, [record(1, 3.0), record(2, 2.5)])
    out = tmp_path / "elsewhere.png"
    assert main(["plot", str(tmp_path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert_png(out)
    assert not (tmp_path / "metrics.png").exists()


def test_load_metrics_keeps_the_last_record_of_a_repeated_step_in_step_order(tmp_path):
    write_metrics(tmp_path, [record(1, 4.0), record(2, 3.0), record(3, 2.9),  # killed after 3
                             "", record(2, 3.5), record(3, 2.8), record(4, 2.7)])  # resumed from 1
    records = load_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] for r in records] == [4.0, 3.5, 2.8, 2.7]


def test_plot_with_repeated_steps_succeeds(tmp_path):
    write_metrics(tmp_path, [record(1, 4.0), record(2, 3.0), record(1, 3.9), record(2, 3.1)])
    assert main(["plot", str(tmp_path)]) == 0
    assert_png(tmp_path / "metrics.png")


@pytest.mark.parametrize("lines, message", [
    (None, "metrics.jsonl does not exist"),
    ([], "holds no metrics"),
    (["", "  "], "holds no metrics"),
    ([json.dumps(record(1, 3.0)), "{not json"], "line 2: not JSON"),
    ([json.dumps(record(1, 3.0)), "", "[1, 2]"], "line 3: not a JSON object"),
    ([json.dumps({"step": 1, "tokens_per_s": 10.0})], "line 1: 'loss' is missing"),
    ([json.dumps({"step": 1, "loss": None, "tokens_per_s": 10.0})], "line 1: 'loss' is null"),
    ([json.dumps({"step": "one", "loss": 1.0, "tokens_per_s": 10.0})], "line 1: 'step' is \"one\""),
    ([json.dumps({"step": 1.5, "loss": 1.0, "tokens_per_s": 10.0})], "line 1: 'step' is 1.5"),
])
def test_plot_reports_bad_metrics(tmp_path, capsys, lines, message):
    if lines is not None:
        write_metrics(tmp_path, lines)
    assert main(["plot", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("ligerzoo plot: error: ") and message in error
    assert not (tmp_path / "metrics.png").exists()


def test_plot_reports_a_missing_directory(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nowhere")]) == 1
    assert "nowhere is not a directory" in capsys.readouterr().err


def test_plot_without_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    write_metrics(tmp_path, [record(1, 3.0)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert main(["plot", str(tmp_path)]) == 1
    assert 'pip install "ligerzoo[plot]"' in capsys.readouterr().err
    assert not (tmp_path / "metrics.png").exists()
