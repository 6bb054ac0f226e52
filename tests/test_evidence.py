"""examples/evidence.py: the protocol's cells and commands, and the tables it writes into docs/RESULTS.md."""

import csv
import sys
from pathlib import Path

import pytest

from conftest import example_module



@pytest.fixture(scope="module")
def evidence():
    with example_module("evidence") as module:
        yield module


@pytest.fixture(scope="module")
def protocol(evidence):
    return sys.modules["evidence_protocol"]  # imported by evidence.py from beside it


@pytest.fixture(scope="module")
def rules(evidence):
    return sys.modules["evidence_rules"]


def write_results(folder: Path, rows):
    folder.mkdir(parents=True)
    with open(folder / "results.csv", "w", newline="") as f:
        fields = ["loss", "frechet_distance", "contaminant_fraction", "auroc", "train_s"]
        writer = csv.DictWriter(f, fieldnames=fields + sorted({k for row in rows for k in row} - set(fields)))
        writer.writeheader()
        writer.writerows(rows)


def test_protocol_covers_the_issue(evidence, protocol):
    cells = {cell.name: cell for cell in evidence.CELLS}
    assert len(cells) == len(evidence.CELLS)  # names are unique
    assert {(c.contamination, c.kind) for c in evidence.CELLS} >= {
        (0.0, "noise"), (0.1, "noise"), (0.3, "noise"), (0.1, "gaussian"), (0.3, "gaussian")}
    for name in ("noise-0.3", "gaussian-0.3", "clean", "noise-0.1", "gaussian-0.1"):
        assert set(protocol.BASELINES) <= set(cells[name].losses)
    assert {"kl+debias", "ned+debias"} <= set(cells["clean"].losses)
    assert {"kl+risk_free", "ned+risk_free"} <= set(cells["gaussian-0.3"].losses)
    assert {c.scale for c in evidence.CELLS} == {"adaptive", "1.0", "vlb", "batch"}
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
    assert "--objective" not in cmd
    flow = next(c for c in evidence.CELLS if c.name == "flow-noise-0.3")
    joined = " ".join(evidence.command(flow, 0, tmp_path, "quick", threads=1))
    assert "--objective flow --timestep-sampling logit_normal" in joined
    assert evidence.kl_cell(flow) is flow  # flow cells compare with their own kl, not DDPM's
    assert evidence.kl_cell(next(c for c in evidence.CELLS if c.name == "noise-0.3-mse")).name == "noise-0.3"


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
    assert rows["kl"] == {"fd": [80.0, 100.0], "contaminant": [0.4, 0.5], "coverage": [], "fd_mean": 90.0,
                          "contaminant_mean": 0.45,
                          "auroc_mean": 0.5, "rare_confident": [], "rare_error": []}
    assert rows["ned"] == {"fd": [60.0], "contaminant": [0.2], "coverage": [], "fd_mean": 60.0, "contaminant_mean": 0.2,
                           "auroc_mean": 0.9, "rare_confident": [], "rare_error": []}
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


def test_temperature_rule_pairs_every_divergence_budget_and_data(evidence, rules):
    pairs = rules.temperature_pairs()
    seen = set()
    for loss, low, high in pairs:
        assert (low.temperature, high.temperature) == (rules.RULE_TEMPERATURE, 1.0)
        assert low.scale == high.scale == "adaptive" and loss in low.losses and loss in high.losses
        assert (low.contamination, low.kind, low.steps) == (high.contamination, high.kind, high.steps)
        seen.add((loss, low.contamination, low.kind, low.steps or 250))
    assert len(seen) == len(pairs) == 12  # the protocol's twelve pairs, none twice
    assert seen == {(loss, p, kind, steps) for loss in ("hellinger", "ned") for steps in (250, 1500)
                    for p, kind in ((0.3, "noise"), (0.3, "gaussian"), (0.0, "noise"))}


def _rule_runs(evidence, root: Path, fd_ratio, contaminant_delta):
    """Both seeds of every cell the rule reads: FD 50 and contaminant fraction 0.2 at temperature 1, and
    at 0.25 the given FD ratio / contaminant difference (callables of (loss, cell))."""
    rules = sys.modules["evidence_rules"]
    for loss, low, high in rules.temperature_pairs():
        for cell, fd, contaminant in ((high, 50.0, 0.2),
                                      (low, 50.0 * fd_ratio(loss, low), 0.2 + contaminant_delta(loss, low))):
            for seed in evidence.SEEDS:
                path = evidence.run_dir(root, cell, seed) / "results.csv"
                rows = []
                if path.is_file():
                    with open(path) as f:
                        rows = list(csv.DictReader(f))
                    path.unlink()
                    path.parent.rmdir()
                rows.append({"loss": loss, "frechet_distance": fd, "contaminant_fraction": contaminant,
                             "auroc": 0.9, "train_s": 1})
                write_results(path.parent, rows)
    return evidence.tables(root)


def test_temperature_rule_adopts_only_when_every_condition_holds(evidence, tmp_path):
    none = lambda loss, cell: 0.0
    block = _rule_runs(evidence, tmp_path / "all", lambda loss, cell: 0.9, none)
    assert "default temperature becomes 0.25" in evidence.temperature_rule(block)
    # Better on balance, but one clean-data pair 6% worse: the 5% clean tolerance decides.
    worse_clean = lambda loss, cell: 1.06 if (loss, cell.name) == ("ned", "clean-tau0.25") else 0.8
    verdict = evidence.temperature_rule(_rule_runs(evidence, tmp_path / "clean", worse_clean, none))
    assert "stays 1" in verdict and "ned clean-tau0.25: FD +6% on clean data" in verdict
    # A contaminated pair may be worse in FD, not in its contaminant fraction.
    worse_noise = lambda loss, cell: 1.3 if cell.name == "gaussian-0.3-tau0.25" else 0.9
    assert "becomes 0.25" in evidence.temperature_rule(_rule_runs(evidence, tmp_path / "fd", worse_noise, none))
    more = lambda loss, cell: 0.03 if (loss, cell.name) == ("hellinger", "noise-0.3-tau0.25") else -0.1
    verdict = evidence.temperature_rule(_rule_runs(evidence, tmp_path / "cf", lambda l, c: 0.9, more))
    assert "stays 1" in verdict and "hellinger noise-0.3-tau0.25: more contaminant-like samples" in verdict
    # Worse on balance for one loss: half its pairs worse is not "more than half better".
    split = lambda loss, cell: (1.02 if cell.contamination else 0.99) if loss == "hellinger" else 0.9
    verdict = evidence.temperature_rule(_rule_runs(evidence, tmp_path / "half", split, none))
    assert "stays 1 (hellinger: not better on balance)" in verdict
    # Pairs not run yet leave it undecided.
    assert "undecided: 12 pair(s) not run yet" in evidence.temperature_rule(evidence.tables(tmp_path / "nothing"))


def _batch_rule_runs(evidence, root: Path, fd_ratio, auroc_drop):
    """Both seeds of every pair the batch-scale rule reads: FD 50 and AUROC 0.9 at the adaptive scale, and with
    scale='batch' the given FD ratio and AUROC drop (callables of the batch cell)."""
    protocol = sys.modules["evidence_protocol"]
    for cell in (c for c in evidence.CELLS if c.scale == "batch"):
        reference = next(c for c in evidence.CELLS if (c.contamination, c.kind, c.scale, c.steps, c.temperature)
                         == (cell.contamination, cell.kind, "adaptive", None, 1.0))
        for target, fd, auroc in ((reference, 50.0, 0.9), (cell, 50.0 * fd_ratio(cell), 0.9 - auroc_drop(cell))):
            for seed in evidence.SEEDS:
                write_results(evidence.run_dir(root, target, seed), [
                    {"loss": loss, "frechet_distance": fd, "contaminant_fraction": 0.2, "auroc": auroc,
                     "train_s": 1} for loss in protocol.BATCH_RULE_LOSSES])
    return evidence.tables(root)


def test_batch_scale_rule_adopts_only_within_both_tolerances(evidence, tmp_path):
    same = lambda cell: 0.0
    block = _batch_rule_runs(evidence, tmp_path / "all", lambda cell: 1.04, lambda cell: 0.04)
    assert "scale='batch' becomes the bounded divergences' functional default" in evidence.batch_scale_rule(block)
    verdict = evidence.batch_scale_rule(_batch_rule_runs(
        evidence, tmp_path / "fd", lambda cell: 1.06 if cell.name == "clean-batch" else 1.0, same))
    assert "stays scale=1.0 (fails: hellinger clean-batch; ned clean-batch)" in verdict
    verdict = evidence.batch_scale_rule(_batch_rule_runs(
        evidence, tmp_path / "auroc", lambda cell: 1.0, lambda cell: 0.06 if cell.kind == "gaussian" else 0.0))
    assert "fails: hellinger gaussian-0.3-batch; ned gaussian-0.3-batch" in verdict
    assert "undecided: 6 pair(s)" in evidence.batch_scale_rule(evidence.tables(tmp_path / "nothing"))


def test_another_preset_tabulates_in_its_own_section_naming_the_device(evidence, tmp_path):
    results_md = tmp_path / "RESULTS.md"
    quick = f"# T\n\n{evidence.BEGIN}\nquick tables\n{evidence.END}\n\ntext after\n"
    results_md.write_text(quick)
    run = tmp_path / "runs" / "noise-0.3" / "seed0"
    write_results(run, [{"loss": "kl", "frechet_distance": 20, "contaminant_fraction": 0.3, "auroc": 0.5,
                         "train_s": 600}])
    (run / "results.md").write_text("# R\n\n- machine: NVIDIA H200, torch 2.11.0\n- data: ...\n")
    evidence.write_report(tmp_path / "runs", 12.0, path=results_md, preset="full")
    text = results_md.read_text()
    assert text.startswith(quick.rstrip("\n"))  # the protocol's tables are untouched
    begin, end = evidence.markers("full")
    full = text.split("## Larger budget: `--preset full`")[1]
    block = full.split(begin)[1].split(end)[0]
    noise = block.split("### noise-0.3:")[1].split("###")[0]
    assert "(NVIDIA H200, torch 2.11.0)" in noise and "| kl | 20 |" in noise
    assert "1500steps" not in block and "Temperature rule" not in block  # quick-only cells and rule
    assert "Not run yet." in block.split("### gaussian-0.3:")[1].split("###")[0]
    assert (tmp_path / "figures" / "evidence_summary_full.png").is_file()
    evidence.write_report(tmp_path / "runs", 12.0, path=results_md, preset="full")
    assert results_md.read_text() == text  # found again, not appended twice
    names = {cell.name for cell in evidence.preset_cells("full")}
    assert "noise-0.3" in names and not any(cell.steps for cell in evidence.preset_cells("full"))
    assert evidence.preset_cells("quick") == list(evidence.CELLS)


def test_tables_name_the_current_machine_for_runs_that_do_not_say(evidence, tmp_path):
    write_results(tmp_path / "clean" / "seed1", [
        {"loss": "kl", "frechet_distance": 30, "contaminant_fraction": 0.0, "auroc": "", "train_s": 70}])
    section = evidence.tables(tmp_path).split("### clean:")[1].split("###")[0]
    assert "Seeds done: 1 of 0, 1" in section and " CPU, " in section and "cores)" in section


def test_paired_interval_is_the_mean_with_its_t_interval(evidence, rules):
    mean, low, high = rules.paired_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and (high - mean) == pytest.approx(4.303 / 3 ** 0.5) and (mean - low) == pytest.approx(high - mean)
    assert rules.paired_interval([0.5])[0] == 0.5 and all(v != v for v in rules.paired_interval([0.5])[1:])


def _normalization_runs(evidence, folder, fd_factor, contaminant_shift):
    protocol = sys.modules["evidence_protocol"]
    for cell in (c for c in evidence.CELLS if c.name.endswith("-normalized")):
        assert cell.seeds == protocol.PAIRED_SEEDS and len(cell.seeds) >= 5
        for seed in cell.seeds:
            fd = 50.0 + 3 * seed
            write_results(folder / cell.name / f"seed{seed}", [
                {"loss": "ned", "frechet_distance": fd, "contaminant_fraction": 0.2, "auroc": 0.9, "train_s": 70},
                {"loss": "ned+normalized", "frechet_distance": fd * (fd_factor + 0.01 * (seed % 2)),
                 "contaminant_fraction": 0.2 + contaminant_shift, "auroc": 0.9, "train_s": 70}])


def test_the_normalization_rule_reads_paired_seeds(evidence, tmp_path):
    assert "undecided" in evidence.normalization_rule(evidence.tables(tmp_path))
    _normalization_runs(evidence, tmp_path / "better", 0.9, 0.0)
    verdict = evidence.normalization_rule(evidence.tables(tmp_path / "better"))
    assert "becomes normalize_influence=True" in verdict and "| clean-normalized | 5 | -9.6% [" in verdict
    _normalization_runs(evidence, tmp_path / "worse", 1.04, 0.0)  # within +5% on average, but its interval is not
    assert "stays normalize_influence=False" in evidence.normalization_rule(evidence.tables(tmp_path / "worse"))
    _normalization_runs(evidence, tmp_path / "junk", 0.9, 0.05)  # better FD, more contaminant-like samples
    verdict = evidence.normalization_rule(evidence.tables(tmp_path / "junk"))
    assert "stays normalize_influence=False (outside the tolerance on noise-0.3-normalized, gaussian-0.3-norm" in verdict


def test_the_demo_ablation_pairs_seeds_across_its_two_cells(evidence, tmp_path):
    cells = {c.name: c for c in evidence.CELLS}
    tau, one = cells["demo-tau0.25"], cells["demo-tau1"]
    assert tau.preset == one.preset == "demo" and len(tau.seeds) >= 5 and tau.seeds == one.seeds
    cmd = evidence.command(one, 0, tmp_path, "quick", threads=1)
    # the demo preset's own temperature is 0.25: a temperature-1 cell must say so, and runs train one at a time
    assert cmd[cmd.index("--temperature") + 1] == "1.0" and cmd[cmd.index("--jobs") + 1] == "1"
    assert cmd[cmd.index("--preset") + 1] == "demo" and evidence.kl_cell(tau) is one
    assert all(c.preset is None for c in evidence.preset_cells("full"))
    for seed in (0, 1, 2):
        common = {"auroc": 0.9, "train_s": 70, "classifier_accuracy": 0.771, "judge_accuracy": 0.9}
        write_results(tmp_path / "demo-tau0.25" / f"seed{seed}", [
            {"loss": "mse", "frechet_distance": 60 + seed, "contaminant_fraction": 0.45 + 0.01 * seed, **common},
            {"loss": "pseudo_huber", "frechet_distance": 40, "contaminant_fraction": 0.1, **common},
            {"loss": "ned", "frechet_distance": 30, "contaminant_fraction": 0.2, **common},
            {"loss": "ned+trust", "frechet_distance": 20, "contaminant_fraction": 0.02 * seed, **common}])
        if seed < 2:  # seed 2 of the temperature-1 cell has not run: the steps that need it pair seeds 0 and 1
            write_results(tmp_path / "demo-tau1" / f"seed{seed}", [
                {"loss": "kl", "frechet_distance": 50, "contaminant_fraction": 0.3, **common},
                {"loss": "ned", "frechet_distance": 40, "contaminant_fraction": 0.3, **common}])
    assert ("Evaluation networks' test accuracy: feature classifier 0.771, class judge 0.900."
            in evidence.sections(evidence.tables(tmp_path))["demo-tau1"])
    text = evidence.demo_ablation(evidence.tables(tmp_path))
    row = next(line for line in text.splitlines() if line.startswith("| the whole recipe, against the standard MSE"))
    # changes -0.45, -0.44, -0.43: mean -0.44, interval -0.44 +- 4.303 * 0.01 / sqrt(3)
    assert "| 0, 1, 2 | -0.440 [-0.465, -0.415] (survives) |" in row
    trust = next(line for line in text.splitlines() if line.startswith("| per-sample trust"))
    assert "-0.180 [-0.230, -0.130] (survives)" in trust  # -0.2, -0.18, -0.16
    assert "-33.3% [-33.3%, -33.3%] (survives)" in trust  # the same FD change on every seed
    scale = next(line for line in text.splitlines() if line.startswith("| the adaptive scale"))
    assert "| 0, 1 |" in scale


def test_rare_truths_rule_reads_the_shares_and_the_gains(evidence, tmp_path, protocol):
    """The rule's verdict from synthetic runs: a candidate that keeps the rare class on both cells and the recipe's
    gains against the MSE is adopted; one that keeps the class but loses the gains is not."""
    mse, recipe, gated, ned_gated = protocol.RARE_LOSSES
    for seed in protocol.PAIRED_SEEDS:
        wobble = 0.001 * seed
        for cell, p in (("rare-3", 0.0), ("rare-3-noise-0.3", 0.3)):
            noisy = p > 0
            write_results(tmp_path / "runs" / cell / f"seed{seed}", [
                {"loss": mse, "frechet_distance": 60 + seed, "contaminant_fraction": 0.45 * noisy + wobble,
                 "rare_confident": 0.03 + wobble, "rare_share": 0.05},
                {"loss": recipe, "frechet_distance": 20 + seed, "contaminant_fraction": 0.01 * noisy + wobble,
                 "rare_confident": 0.002 + wobble / 10, "rare_share": 0.01},
                {"loss": gated, "frechet_distance": 21 + seed, "contaminant_fraction": 0.009 * noisy + wobble,
                 "rare_confident": 0.029 + wobble, "rare_share": 0.05},
                {"loss": ned_gated, "frechet_distance": 55 + seed, "contaminant_fraction": 0.3 * noisy + wobble,
                 "rare_confident": 0.028 + wobble, "rare_share": 0.05}])
    block = evidence.tables(tmp_path / "runs")
    assert "| rare share | rare confident | rare AUROC |" in evidence.sections(block)["rare-3"]
    verdict = evidence.rare_truths_rule(block)
    assert f"`{gated}` meets the rare target" in verdict
    assert f"| {ned_gated} |" in verdict and "| no |" in verdict  # kept the class, lost the gains
    assert f"| rare-3 | {recipe} | 0.0022 | 7% |" in verdict  # today's recipe kept 7% of the MSE's share
    # without the runs there is nothing to decide
    assert "not decided" in evidence.rare_truths_rule(evidence.tables(tmp_path / "none"))


def test_trust_validation_rule_names_the_kinds_where_trust_fails(evidence, tmp_path, protocol):
    """Trust that lowers the contaminant fraction is validated; trust that raises FD by a fifth on clean data is
    not; with two cells not validated the verdict asks for the next round."""
    for seed in protocol.PAIRED_SEEDS:
        wobble = 0.002 * seed
        for cell, fd_with, cont_with in (("trust-gaussian-0.3", 50, 0.10), ("trust-dataset-0.3", 61, 0.30),
                                         ("trust-flow-noise-0.3", 40, 0.05), ("trust-clean", 60, 0.0)):
            write_results(tmp_path / "runs" / cell / f"seed{seed}", [
                {"loss": "ned", "frechet_distance": 50 + seed, "contaminant_fraction": 0.2 + wobble},
                {"loss": "ned+trust", "frechet_distance": fd_with + seed, "contaminant_fraction": cont_with + wobble}])
    verdict = evidence.trust_validation_rule(evidence.tables(tmp_path / "runs"))
    rows = {line.split(" | ")[0].strip("| "): line for line in verdict.splitlines() if line.startswith("| trust-")}
    assert rows["trust-gaussian-0.3"].endswith("| yes |") and rows["trust-flow-noise-0.3"].endswith("| yes |")
    assert rows["trust-dataset-0.3"].endswith("| no |") and rows["trust-clean"].endswith("| no |")
    assert "not validated on trust-dataset-0.3, trust-clean" in verdict and "t < T/4 and t < 3T/4" in verdict
    assert "not decided" in evidence.trust_validation_rule(evidence.tables(tmp_path / "none"))


def test_trust_levels_rule_changes_the_default_only_for_a_setting_that_does_better_everywhere(evidence, tmp_path,
                                                                                             protocol):
    """Second round: per kind, ned and ned+trust at T/2 in trust-<kind>, ned+trust at T/4 and 3T/4 in its own
    cells. A setting validated wherever T/2 is and on more kinds becomes the default; otherwise T/2 stays."""
    def write(root, trusted):
        """trusted: {(kind, level): (FD of ned+trust, contaminant fraction of ned+trust)}; ned: FD 50, 0.2"""
        for seed in protocol.PAIRED_SEEDS:
            wobble = 0.002 * seed
            for kind, p, _, _ in protocol.TRUST_KINDS:
                for level in protocol.TRUST_LEVELS:
                    fd, cont = trusted[kind, level]
                    row = {"loss": "ned+trust", "frechet_distance": fd + seed, "contaminant_fraction": cont + wobble}
                    if level == 0.5:
                        write_results(root / f"trust-{kind}" / f"seed{seed}", [
                            {"loss": "ned", "frechet_distance": 50 + seed, "contaminant_fraction": 0.2 + wobble},
                            row])
                    else:
                        write_results(root / f"trust-{kind}-low{level}" / f"seed{seed}", [row])

    kinds = [kind for kind, *_ in protocol.TRUST_KINDS]
    good, bad = (40, 0.05), (60, 0.3)
    # T/2 holds on noise and flow; T/4 on those and on clean; 3T/4 only on gaussian
    trusted = {(kind, level): good if (level == 0.5 and kind in ("noise-0.3", "flow-noise-0.3"))
               or (level == 0.25 and kind in ("noise-0.3", "flow-noise-0.3", "clean"))
               or (level == 0.75 and kind == "gaussian-0.3") else bad
               for kind in kinds for level in protocol.TRUST_LEVELS}
    write(tmp_path / "better", trusted)
    verdict = evidence.trust_levels_rule(evidence.tables(tmp_path / "better"))
    assert "it becomes the default (TrainConfig.trust_low_noise = 0.25)" in verdict
    assert "| clean | t < 0.25 T | 0, 1, 2, 3, 4 | (clean data) |" in verdict
    # 3T/4 on more kinds than T/2 but not where T/2 holds: the default stays
    trusted.update({(kind, 0.25): bad for kind in kinds})
    trusted.update({(kind, 0.75): good for kind in ("gaussian-0.3", "dataset-0.3", "clean")})
    write(tmp_path / "other", trusted)
    verdict = evidence.trust_levels_rule(evidence.tables(tmp_path / "other"))
    assert "the default stays 0.5" in verdict and "t < 0.75 T on clean, dataset-0.3, gaussian-0.3" in verdict
    # the first round's verdict reads only its own four cells
    assert "| trust-noise-0.3 |" not in evidence.trust_validation_rule(evidence.tables(tmp_path / "other"))
    assert "not decided" in evidence.trust_levels_rule(evidence.tables(tmp_path / "none"))


def test_trust_level_cells_pass_their_setting(evidence, protocol, tmp_path):
    cells = {cell.name: cell for cell in protocol.CELLS}
    command = evidence.command(cells["trust-clean-low0.25"], 2, tmp_path, "quick", 1)
    assert command[command.index("--trust-low-noise") + 1] == "0.25" and "ned+trust" in command
    assert "--trust-low-noise" not in evidence.command(cells["trust-noise-0.3"], 2, tmp_path, "quick", 1)


def test_rare_learning_rule_reads_the_error_ratio_and_the_gains(evidence, tmp_path, protocol, rules):
    """Third round: a candidate whose rare-class error ratio stays within +0.05 of the MSE's on both cells and
    keeps the recipe's gains is adopted; the recipe's own ratio decides what the README says otherwise."""
    mse, recipe, gated = protocol.RARE_LOSSES_DEMO

    def write(root, ratio):
        for seed in protocol.PAIRED_SEEDS:
            wobble = 0.002 * seed
            for cell, p in (("rare-3-demo", 0.0), ("rare-3-noise-0.3-demo", 0.3)):
                noisy = p > 0
                write_results(root / cell / f"seed{seed}", [
                    {"loss": loss, "frechet_distance": fd + seed, "contaminant_fraction": cont * noisy + wobble,
                     "rare_confident": 0.001, "rare_share": 0.005, "rare_error_ratio": ratio[loss] + wobble}
                    for loss, fd, cont in ((mse, 60, 0.45), (recipe, 20, 0.01), (gated, 21, 0.009))])

    write(tmp_path / "a", {mse: 1.2, recipe: 1.5, gated: 1.22})
    verdict = rules.rare_learning_rule(evidence.tables(tmp_path / "a"))
    assert f"`{gated}` learns the rare class as the MSE does on both cells" in verdict
    assert "| rare-3-demo | ned+trust | 1.504 |" in verdict and "| no |" in verdict
    write(tmp_path / "b", {mse: 1.2, recipe: 1.21, gated: 1.6})
    assert "today's recipe (`ned+trust`) learns the rare class as the MSE does" in rules.rare_learning_rule(
        evidence.tables(tmp_path / "b"))
    write(tmp_path / "c", {mse: 1.2, recipe: 1.5, gated: 1.6})
    assert "learns a rare class less well" in rules.rare_learning_rule(evidence.tables(tmp_path / "c"))
    assert "not decided" in rules.rare_learning_rule(evidence.tables(tmp_path / "none"))
