"""`ligerzoo plot DIR` (ligerzoo/cli.py): a PNG of the loss and tokens/s of DIR/metrics.jsonl, the
last record for a step written twice (a resumed run), and clear errors for bad input; --out writes
the format its suffix names and never overwrites a file that is not an earlier plot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ligerzoo.cli import main
from ligerzoo.training.metrics import read_metrics as load_metrics

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


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


# --- the output file ---------------------------------------------------------------------------
@pytest.mark.parametrize("suffix, begins", [
    (".svg", b"<?xml"), (".pdf", b"%PDF-"), (".jpg", b"\xff\xd8\xff"), (".jpeg", b"\xff\xd8\xff"),
    (".eps", b"%!PS-Adobe"), (".PNG", PNG_SIGNATURE),
])
def test_plot_writes_the_format_the_suffix_of_out_names(tmp_path, suffix, begins):
    write_metrics(tmp_path, [record(1, 3.0), record(2, 2.5)])
    out = tmp_path / f"curves{suffix}"
    assert main(["plot", str(tmp_path), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(begins)
    if suffix == ".svg":
        assert b"<svg" in data[:1000]


@pytest.mark.parametrize("name", ["metrics.jsonl", "model.safetensors", "curves", "notes.txt"])
def test_plot_refuses_an_out_whose_suffix_is_no_image_format_and_leaves_the_file(tmp_path, capsys, name):
    write_metrics(tmp_path, [record(1, 3.0), record(2, 2.5)])
    out = tmp_path / name
    if not out.exists():
        out.write_bytes(b"precious bytes")
    before = out.read_bytes()
    assert main(["plot", str(tmp_path), "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"ligerzoo plot: error: cannot write the plot to {out}: ")
    assert ("has no suffix" if name == "curves" else "names no image format") in error
    assert out.read_bytes() == before


def test_plot_refuses_to_overwrite_a_file_that_is_not_an_image_of_its_format(tmp_path, capsys):
    write_metrics(tmp_path, [record(1, 3.0), record(2, 2.5)])
    out = tmp_path / "curves.png"
    out.write_text('{"step": 1}\n')  # a renamed metrics file, or an SVG named .png: not a PNG
    assert main(["plot", str(tmp_path), "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"ligerzoo plot: error: not overwriting {out}: it exists and is not a PNG image; choose another "
        "--out, or remove the file")
    assert out.read_text() == '{"step": 1}\n'


def test_plot_replaces_an_earlier_plot_of_the_same_name(tmp_path):
    write_metrics(tmp_path, [record(1, 3.0), record(2, 2.5)])
    for out in (tmp_path / "metrics.png", tmp_path / "curves.svg"):
        assert main(["plot", str(tmp_path), "--out", str(out)]) == 0
        first = out.read_bytes()
        write_metrics(tmp_path, [record(step, 3.0 / step) for step in range(1, 30)])
        assert main(["plot", str(tmp_path), "--out", str(out)]) == 0
        assert out.read_bytes() != first


def test_plot_out_in_a_missing_directory_or_at_a_directory_is_refused(tmp_path, capsys):
    write_metrics(tmp_path, [record(1, 3.0)])
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "nowhere" / "x.png")]) == 1
    assert f"no such directory: {tmp_path / 'nowhere'}" in capsys.readouterr().err
    (tmp_path / "figures.png").mkdir()
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "figures.png")]) == 1
    assert "it is a directory" in capsys.readouterr().err


def test_plot_without_pillow_says_to_install_it(tmp_path):
    write_metrics(tmp_path, [record(1, 3.0)])
    out = tmp_path / "curves.jpg"
    # A fresh process: matplotlib imports pillow when it is first imported.
    code = ("import sys; sys.modules['PIL'] = None; from ligerzoo.cli import main; "
            f"raise SystemExit(main(['plot', {str(tmp_path)!r}, '--out', {str(out)!r}]))")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "ligerzoo plot: error: matplotlib needs pillow, which is not installed: pip install pillow")
    assert not out.exists()
