"""examples/evidence.py: the protocol's cells and commands, and the tables it writes into docs/RESULTS.md."""

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def evidence():
    spec = importlib.util.spec_from_file_location("evidence", REPO / "examples" / "evidence.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["evidence"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("evidence", None)


def write_results(folder: Path, rows):
    folder.mkdir(parents=True)
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["loss", "frechet_distance", "contaminant_fraction", "auroc", "train_s"])
        writer.writeheader()
        writer.writerows(rows)


def test_protocol_covers_the_issue(evidence):
    cells = {cell.name: cell for cell in evidence.CELLS}
    assert len(cells) == len(evidence.CELLS)  # names are unique
    assert {(c.contamination, c.kind) for c in evidence.CELLS} >= {
        (0.0, "noise"), (0.1, "noise"), (0.3, "noise"), (0.1, "gaussian"), (0.3, "gaussian")}
    for name in ("noise-0.3", "gaussian-0.3", "clean", "noise-0.1", "gaussian-0.1"):
        assert set(evidence.BASELINES) <= set(cells[name].losses)
    assert {"kl+debias", "ned+debias"} <= set(cells["clean"].losses)
    assert {"kl+risk_free", "ned+risk_free"} <= set(cells["gaussian-0.3"].losses)
    assert {c.scale for c in evidence.CELLS} == {"adaptive", "1.0", "vlb"}
    assert len(evidence.SEEDS) >= 2


def test_command_runs_the_example_with_the_cell(evidence, tmp_path):
    cell = next(c for c in evidence.CELLS if c.name == "gaussian-0.3-vlb")
    cmd = evidence.command(cell, 1, tmp_path, "quick", threads=1)
    assert cmd[1] == str(evidence.EXAMPLE)
    joined = " ".join(cmd)
    for part in ("--contamination 0.3", "--kind gaussian", "--scale vlb", "--seed 1", "--threads 1", "--resume",
                 f"--out {tmp_path / 'gaussian-0.3-vlb' / 'seed1'}", f"--eval-cache {tmp_path / 'eval_cache'}"):
        assert part in joined
    assert cmd[cmd.index("--losses") + 1:cmd.index("--scale")] == list(cell.losses)
    assert "--temperature" not in cmd  # tau = 1 is the example's default
    cold = next(c for c in evidence.CELLS if c.temperature != 1.0)
    cmd = evidence.command(cold, 0, tmp_path, "quick", threads=None)
    assert cmd[cmd.index("--temperature") + 1] == str(cold.temperature)


def test_tables_aggregate_seeds_and_mark_missing_cells(evidence, tmp_path):
    write_results(tmp_path / "noise-0.3" / "seed0", [
        {"loss": "kl", "frechet_distance": 80, "contaminant_fraction": 0.4, "auroc": 0.5, "train_s": 70},
        {"loss": "ned", "frechet_distance": 60, "contaminant_fraction": 0.2, "auroc": 0.9, "train_s": 72}])
    write_results(tmp_path / "noise-0.3" / "seed1", [
        {"loss": "kl", "frechet_distance": 100, "contaminant_fraction": 0.5, "auroc": 0.5, "train_s": 70},
        {"loss": "ned", "frechet_distance": 90, "contaminant_fraction": 0.3, "auroc": 0.8, "train_s": 71}])
    write_results(tmp_path / "noise-0.3-scale1" / "seed0", [
        {"loss": "ned", "frechet_distance": 100, "contaminant_fraction": 0.5, "auroc": 0.7, "train_s": 70}])
    text = evidence.tables(tmp_path)
    # the scale cells train no KL: they are compared with the KL of the adaptive cell on the same data
    scale_section = text.split("### noise-0.3-scale1:")[1].split("###")[0]
    assert "in `noise-0.3`" in scale_section and "| ned | 100 | +25% |" in scale_section
    section = text.split("### noise-0.3:")[1].split("###")[0]
    assert "Seeds done: 0, 1" in section
    assert "| kl | 90 (80, 100) |  | 0.45 (0.4, 0.5) |" in section
    # FD change against KL, seed by seed: -25% and -10%, mean -18% (rounded)
    assert "| ned | 75 (60, 90) | -18% | 0.25 (0.2, 0.3) | 0.85 (0.9, 0.8) |" in section
    assert "| hellinger | not run |" in section
    assert "| data: clean training images |" not in text.split("### noise-0.3-scale1")[1].split("###")[0]
    assert "### clean: p = 0.0, noise" in text and "Not run yet." in text.split("### clean")[1].split("###")[0]


def test_report_replaces_only_the_marked_section(evidence, tmp_path):
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text(f"# Title\n\nhand-written protocol\n\n{evidence.BEGIN}\nold tables\n{evidence.END}\n\nafter\n")
    evidence.write_report(tmp_path / "runs", 3.0, path=results_md)
    text = results_md.read_text()
    assert text.startswith("# Title\n\nhand-written protocol\n\n") and text.endswith("\n\nafter\n")
    assert "old tables" not in text and "Not run yet." in text and "this invocation ran 3 min" in text
    results_md.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        evidence.write_report(tmp_path / "runs", None, path=results_md)


def test_report_keeps_tables_of_cells_without_runs(evidence, tmp_path):
    results_md = tmp_path / "RESULTS.md"
    kept = ("### clean: p = 0.0, noise (old question)\n\nSeeds done: 0, 1 of 0, 1, tabulated 2026-01-01.\n\n"
            "| loss | FD |\n|---|---|\n| kl | 36.8 |\n")
    stale = "### noise-0.3: p = 0.3, noise (old)\n\nSeeds done: 0 of 0, 1.\n\n| kl | 999 |\n"
    results_md.write_text(f"# T\n\n{evidence.BEGIN}\nold stamp\n\n{kept}\n{stale}\n{evidence.END}\n")
    write_results(tmp_path / "runs" / "noise-0.3" / "seed0", [
        {"loss": "kl", "frechet_distance": 80, "contaminant_fraction": 0.4, "auroc": 0.5, "train_s": 70}])
    evidence.write_report(tmp_path / "runs", None, path=results_md)
    text = results_md.read_text()
    assert kept in text and "old stamp" not in text  # no runs on disk: its table stays, verbatim
    noise = text.split("### noise-0.3:")[1].split("###")[0]
    assert "| kl | 80 |" in noise and "999" not in noise  # runs on disk replace the old table
    assert "Not run yet." in text.split("### gaussian-0.3:")[1].split("###")[0]
    evidence.write_report(tmp_path / "runs", None, path=results_md)
    assert results_md.read_text() == text  # rewriting is idempotent


def test_summary_figure_reads_the_generated_tables(evidence, tmp_path):
    write_results(tmp_path / "runs" / "noise-0.3" / "seed0", [
        {"loss": "kl", "frechet_distance": 80, "contaminant_fraction": 0.4, "auroc": 0.5, "train_s": 70},
        {"loss": "ned", "frechet_distance": 60, "contaminant_fraction": 0.2, "auroc": 0.9, "train_s": 72}])
    write_results(tmp_path / "runs" / "noise-0.3" / "seed1", [
        {"loss": "kl", "frechet_distance": 100, "contaminant_fraction": 0.5, "auroc": 0.5, "train_s": 70}])
    block = evidence.tables(tmp_path / "runs")
    rows = evidence.parse_rows(evidence.sections(block)["noise-0.3"])
    assert rows["kl"] == {"fd": [80.0, 100.0], "contaminant": [0.4, 0.5]}
    assert rows["ned"] == {"fd": [60.0], "contaminant": [0.2]}
    assert "hellinger" not in rows and not any(name.startswith("data") for name in rows)  # not run; data rows
    figure = tmp_path / "summary.png"
    assert evidence.summary_figure(block, figure) and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not evidence.summary_figure(evidence.tables(tmp_path / "none"), tmp_path / "empty.png")


def test_later_cells_compare_with_the_kept_kl_table(evidence, tmp_path):
    kept = {"noise-0.3": "### noise-0.3: p = 0.3, noise (q)\n\nSeeds done: 0, 1 of 0, 1, tabulated 2026-01-01.\n\n"
                         "| loss | FD | vs KL | contaminant fraction | influence AUROC | train s |\n|---|---|---|---|---|---|\n"
                         "| kl | 90 (80, 100) |  | 0.45 (0.4, 0.5) | 0.5 (0.5, 0.5) | 70 (70, 70) |\n"}
    assert evidence.kept_kl(kept["noise-0.3"]) == {0: {"frechet_distance": "80.0"}, 1: {"frechet_distance": "100.0"}}
    assert evidence.kept_kl("") == {}
    write_results(tmp_path / "noise-0.3-mse" / "seed0", [
        {"loss": "kl", "frechet_distance": 100, "contaminant_fraction": 0.5, "auroc": 0.5, "train_s": 70}])
    section = evidence.tables(tmp_path, kept=kept).split("### noise-0.3-mse:")[1].split("###")[0]
    assert "| kl | 100 | +25% |" in section  # the standard MSE against the adaptive-scale KL of seed 0 (80)
