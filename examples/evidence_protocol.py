"""The protocol of docs/RESULTS.md's evidence grid: its cells (what data, losses, budget and seeds each runs) and
the constants its rules were written with. `examples/evidence.py` runs the cells; `examples/evidence_rules.py`
reads their tables into the rules' verdicts. A cell added after others had run says so in its comment, with the
rule it was added for."""

from __future__ import annotations

from dataclasses import dataclass

BASELINES = ["kl", "hellinger", "ned", "alpha", "huber", "pseudo_huber", "clipped_mse"]
DIVERGENCES = ["hellinger", "ned", "alpha"]


@dataclass(frozen=True)
class Cell:
    name: str
    contamination: float
    kind: str
    losses: tuple
    scale: str = "adaptive"
    question: str = ""
    steps: int | None = None  # training steps per loss (default: the preset's)
    temperature: float = 1.0  # the adaptive scale's tau
    objective: str = "ddpm"  # or "flow": flow matching with SD3's logit-normal times (FLOW_SAMPLING)
    seeds: tuple = (0, 1)  # the protocol's two seeds; the cells that decide by paired intervals run PAIRED_SEEDS
    preset: str | None = None  # the example's preset when not the grid's (the main job's "demo")
    rare_class: int | None = None  # a class kept at rare_fraction of the training images (the rare-truths control)
    rare_fraction: float = 0.03
    samples: int | None = None  # generated samples per loss (default: the preset's)
    trust_low_noise: float = 0.5  # +trust: the draws trust is measured on, t below this fraction of T


# The rule (docs/RESULTS.md, Protocol; committed together with its cells' results) that decides whether
# scale="batch" becomes the default of the bounded-influence divergences' functional losses.
BATCH_RULE_LOSSES = ("hellinger", "ned")
BATCH_RULE_AUROC_TOLERANCE = 0.05  # at p > 0, influence AUROC at most 0.05 below the adaptive scale's
BATCH_RULE_FD_TOLERANCE = 0.05  # everywhere, FD at most 5% above the adaptive scale's

#: Seeds of the cells whose rule reads paired differences with 95% intervals (at least five).
PAIRED_SEEDS = (0, 1, 2, 3, 4)

# The rule, fixed before its cells ran (docs/RESULTS.md, Protocol, "Rare-truths rule"): the class kept rare, the
# losses compared (the standard MSE, today's recipe, then the candidates) and the targets.
RARE_CLASS = 1  # Trouser
RARE_LOSSES = ("mse", "ned+trust", "kl+trust+coherent", "ned+trust+coherent")
RARE_LOSSES_DEMO = ("mse", "ned+trust", "ned+trust+coherent")  # the second round: the candidate that kept the gains
RARE_KEEP = 0.8  # a candidate keeps at least 80% of the MSE's mean confident share of the rare class
RARE_ERROR_TOLERANCE = 0.05  # third round: the rare-class error ratio may exceed the MSE's by at most 0.05
RARE_INFORMATIVE = 0.005  # a cell where the MSE's mean confident share is below 0.5% cannot test that

# The rule, fixed before its cells ran (docs/RESULTS.md, Protocol, "Influence normalisation rule"), that decides
# RobustDiffusionLoss's default normalize_influence.
# The kinds trust is validated on (docs/RESULTS.md, Protocol, "Trust beyond noise images" and its second round):
# (cell name's kind, p, contaminant kind, objective); the first is the kind it was designed on.
TRUST_KINDS = (("noise-0.3", 0.3, "noise", "ddpm"), ("gaussian-0.3", 0.3, "gaussian", "ddpm"),
               ("dataset-0.3", 0.3, "dataset", "ddpm"), ("flow-noise-0.3", 0.3, "noise", "flow"),
               ("clean", 0.0, "noise", "ddpm"))
#: The settings of trust's second round: TrainConfig.trust_low_noise, the default first.
TRUST_LEVELS = (0.5, 0.25, 0.75)
TRUST_CONTAMINANT_TOLERANCE = 0.02  # the contaminant fraction's interval may reach at most +0.02 with trust
TRUST_FD_TOLERANCE = 0.05  # and the FD change's must stay below +5%

NORMALIZATION_LOSS = "ned"
NORMALIZATION_FD_TOLERANCE = 0.05  # on every kind, the upper 95% bound of the mean paired FD change below +5%
NORMALIZATION_CONTAMINANT_TOLERANCE = 0.02  # on contaminated kinds, that of the contaminant fraction at most +0.02

# The protocol, in the order it is run (the first cells answer the main questions).
CELLS = [
    Cell("noise-0.3", 0.3, "noise", tuple(BASELINES), question="robustness to noise images"),
    Cell("gaussian-0.3", 0.3, "gaussian", tuple(BASELINES + ["kl+risk_free", "ned+risk_free"]),
         question="robustness to known-std Gaussian noise; risk-free loss vs standard"),
    Cell("clean", 0.0, "noise", tuple(BASELINES + ["kl+debias", "ned+debias"]),
         question="the cost on clean data; constant vs debias weighting"),
    Cell("noise-0.3-scale1", 0.3, "noise", tuple(DIVERGENCES), scale="1.0", question="fixed scale 1 vs adaptive"),
    Cell("gaussian-0.3-scale1", 0.3, "gaussian", tuple(DIVERGENCES), scale="1.0",
         question="fixed scale 1 vs adaptive"),
    Cell("noise-0.3-vlb", 0.3, "noise", tuple(DIVERGENCES), scale="vlb", question="DDPM's lambda_t scale vs adaptive"),
    Cell("gaussian-0.3-vlb", 0.3, "gaussian", tuple(DIVERGENCES), scale="vlb",
         question="DDPM's lambda_t scale vs adaptive"),
    # Added after the cells above had run (their seed spread is as large as the gaps between losses): the
    # main comparison at six times the training budget.
    Cell("noise-0.3-1500steps", 0.3, "noise", ("kl", "ned", "pseudo_huber"), steps=1500,
         question="the main comparison at 6x the budget"),
    Cell("gaussian-0.3-1500steps", 0.3, "gaussian", ("kl", "ned", "pseudo_huber"), steps=1500,
         question="the main comparison at 6x the budget"),
    Cell("noise-0.1", 0.1, "noise", tuple(BASELINES), question="robustness at a lower contamination"),
    Cell("gaussian-0.1", 0.1, "gaussian", tuple(BASELINES), question="robustness at a lower contamination"),
    # Added after all cells above had run. Every loss above, KL included, trains at the adaptive scale, which
    # for KL means MSE divided by the running median penalty of the sample's noise level: a timestep
    # reweighting, not the standard MSE. The `-mse` cells train the standard MSE (kl at scale 1 is
    # F.mse_loss) on the same data; the `tau` cells ask whether a lower temperature (contaminants weigh
    # less) halves the contaminant fraction on noise images, where tau = 1 did not; `clean-1500steps` asks
    # whether the clean-data cost of the 250-step cells shrinks with the budget that made NED pay off.
    Cell("noise-0.3-mse", 0.3, "noise", ("kl",), scale="1.0", question="standard MSE: kl at scale 1"),
    Cell("gaussian-0.3-mse", 0.3, "gaussian", ("kl",), scale="1.0", question="standard MSE: kl at scale 1"),
    Cell("clean-mse", 0.0, "noise", ("kl",), scale="1.0", question="standard MSE: kl at scale 1"),
    Cell("noise-0.3-tau0.5", 0.3, "noise", ("hellinger", "ned"), temperature=0.5,
         question="adaptive scale with temperature 0.5 instead of 1"),
    Cell("noise-0.3-tau0.25", 0.3, "noise", ("hellinger", "ned"), temperature=0.25,
         question="adaptive scale with temperature 0.25 instead of 1"),
    Cell("noise-0.3-1500steps-mse", 0.3, "noise", ("kl",), scale="1.0", steps=1500,
         question="standard MSE at 6x the budget"),
    Cell("gaussian-0.3-1500steps-mse", 0.3, "gaussian", ("kl",), scale="1.0", steps=1500,
         question="standard MSE at 6x the budget"),
    Cell("clean-1500steps", 0.0, "noise", ("kl", "ned"), steps=1500, question="the cost on clean data at 6x the budget"),
    Cell("clean-1500steps-mse", 0.0, "noise", ("kl",), scale="1.0", steps=1500, question="standard MSE at 6x the budget"),
    # Added after the cells above had run: temperature 0.25, which halved NED's contaminant fraction at 250
    # steps on noise images, at the budget of the main comparison on both kinds.
    Cell("noise-0.3-1500steps-tau0.25", 0.3, "noise", ("ned",), steps=1500, temperature=0.25,
         question="temperature 0.25 at 6x the budget"),
    Cell("gaussian-0.3-1500steps-tau0.25", 0.3, "gaussian", ("ned",), steps=1500, temperature=0.25,
         question="temperature 0.25 at 6x the budget"),
    Cell("clean-1500steps-tau0.25", 0.0, "noise", ("ned",), steps=1500, temperature=0.25,
         question="temperature 0.25 at 6x the budget, on clean data"),
    # Added after the cells above had run, with the rule that decides the default temperature written down
    # first (docs/RESULTS.md, protocol; `temperature_rule` below applies it): temperature 0.25 where it was
    # still untested, i.e. at 250 steps on Gaussian noise and clean data, and for Hellinger at 1500 steps
    # (which had not run at 1500 steps at all, so temperature 1 as well).
    Cell("gaussian-0.3-tau0.25", 0.3, "gaussian", ("hellinger", "ned"), temperature=0.25,
         question="adaptive scale with temperature 0.25 instead of 1"),
    Cell("clean-tau0.25", 0.0, "noise", ("hellinger", "ned"), temperature=0.25,
         question="adaptive scale with temperature 0.25 instead of 1, on clean data"),
    Cell("noise-0.3-1500steps-hellinger", 0.3, "noise", ("hellinger",), steps=1500,
         question="Hellinger at 6x the budget"),
    Cell("noise-0.3-1500steps-hellinger-tau0.25", 0.3, "noise", ("hellinger",), steps=1500, temperature=0.25,
         question="Hellinger, temperature 0.25 at 6x the budget"),
    Cell("gaussian-0.3-1500steps-hellinger", 0.3, "gaussian", ("hellinger",), steps=1500,
         question="Hellinger at 6x the budget"),
    Cell("gaussian-0.3-1500steps-hellinger-tau0.25", 0.3, "gaussian", ("hellinger",), steps=1500,
         temperature=0.25, question="Hellinger, temperature 0.25 at 6x the budget"),
    Cell("clean-1500steps-hellinger", 0.0, "noise", ("hellinger",), steps=1500,
         question="Hellinger at 6x the budget, on clean data"),
    Cell("clean-1500steps-hellinger-tau0.25", 0.0, "noise", ("hellinger",), steps=1500, temperature=0.25,
         question="Hellinger, temperature 0.25 at 6x the budget, on clean data"),
    # Added after the cells above had run: the debias weighting failed at 250 steps (the noisiest timesteps
    # dominate the loss and the last denoising steps are not learnt); its paper trains far longer.
    Cell("clean-1500steps-debias", 0.0, "noise", ("kl+debias", "ned+debias"), steps=1500,
         question="constant vs debias weighting at 6x the budget"),
    # Added after the cells above had run, with the rule that decides (docs/RESULTS.md, Protocol, "Rule for a
    # stateless default scale", committed with these cells' results; `batch_scale_rule` applies it): the stateless
    # scale="batch" (no running state, so the functional losses can have it) against the adaptive scale of
    # noise-0.3, gaussian-0.3 and clean.
    Cell("noise-0.3-batch", 0.3, "noise", BATCH_RULE_LOSSES, scale="batch", question="stateless batch scale"),
    Cell("gaussian-0.3-batch", 0.3, "gaussian", BATCH_RULE_LOSSES, scale="batch", question="stateless batch scale"),
    Cell("clean-batch", 0.0, "noise", BATCH_RULE_LOSSES, scale="batch",
         question="stateless batch scale, on clean data"),
    # Added after the cells above had run, the reading rule written first (docs/RESULTS.md, Protocol,
    # "Flow-matching cells"): the main comparison with flow matching instead of DDPM.
    Cell("flow-noise-0.3", 0.3, "noise", ("mse", "kl", "hellinger", "ned", "pseudo_huber"), objective="flow",
         question="flow matching: robustness to noise images"),
    Cell("flow-gaussian-0.3", 0.3, "gaussian", ("mse", "kl", "hellinger", "ned", "pseudo_huber"), objective="flow",
         question="flow matching: robustness to known-std Gaussian noise"),
    # Added after the cells above had run, with the rule written first (docs/RESULTS.md, Protocol, "Influence
    # normalisation rule"; `normalization_rule` applies it): NED at the module's defaults with and without the
    # loss divided by the batch's mean influence weight, five seeds, paired.
    *(Cell(f"{name}-normalized", p, kind, (NORMALIZATION_LOSS, f"{NORMALIZATION_LOSS}+normalized"),
           seeds=PAIRED_SEEDS, question="normalize_influence: the loss divided by the batch's mean influence weight")
      for name, p, kind in (("noise-0.3", 0.3, "noise"), ("gaussian-0.3", 0.3, "gaussian"), ("clean", 0.0, "noise"))),
    # Added with the rule written first (docs/RESULTS.md, Protocol, "Demo ablation"; `demo_ablation` reads it): the
    # main job's recipe and what each of its ingredients adds, and the strongest baseline a user could configure,
    # at the main job's budget, five seeds, paired.
    Cell("demo-tau0.25", 0.3, "noise", ("mse", "pseudo_huber", "ned", "ned+trust"), temperature=0.25, preset="demo",
         seeds=PAIRED_SEEDS, question="the main job's recipe, its ablation and the strongest baseline"),
    Cell("demo-tau1", 0.3, "noise", ("kl", "ned"), preset="demo", seeds=PAIRED_SEEDS,
         question="the main job's ablation at temperature 1"),
    # Added with the rule written first (docs/RESULTS.md, Protocol, "Rare-truths rule"; `rare_truths_rule` applies
    # it): a legitimately rare class, on clean data and beside noise images, under today's recipe and two
    # candidates that gate its trust by coherence; five seeds, paired, 1,000 samples a loss.
    *(Cell(name, p, "noise", RARE_LOSSES, temperature=0.25, seeds=PAIRED_SEEDS, rare_class=RARE_CLASS,
           rare_fraction=0.03, samples=1000, question=question)
      for name, p, question in (("rare-3", 0.0, "Trouser at 3% of clean data: does the recipe keep a rare class?"),
                                ("rare-3-noise-0.3", 0.3, "Trouser at 3% beside 30% noise images"))),
    # Added with the rule written first (docs/RESULTS.md, Protocol, "Trust beyond noise images"): trust against no
    # trust on the kinds it was not designed on, and on clean data, five seeds, paired.
    *(Cell(f"trust-{name}", p, kind, ("ned", "ned+trust"), temperature=0.25, seeds=PAIRED_SEEDS, objective=objective,
           question="per-sample trust on a kind it was not designed on")
      for name, p, kind, objective in TRUST_KINDS[1:]),
    # Trust's second round, its rule written after the first round's verdict and before its runs (docs/RESULTS.md,
    # Protocol, "Trust's noise levels, second round"): the kind trust was designed on, at its setting t < T/2, and
    # every kind with trust measured on t < T/4 and on t < 3T/4 instead.
    Cell("trust-noise-0.3", 0.3, "noise", ("ned", "ned+trust"), temperature=0.25, seeds=PAIRED_SEEDS,
         question="per-sample trust on the kind it was designed on"),
    *(Cell(f"trust-{name}-low{low}", p, kind, ("ned+trust",), temperature=0.25, seeds=PAIRED_SEEDS,
           objective=objective, trust_low_noise=low, question=f"trust measured on the draws with t < {low} T")
      for low in TRUST_LEVELS[1:] for name, p, kind, objective in TRUST_KINDS),
    # The second round, its rule written after the first round's verdict and before its runs (docs/RESULTS.md,
    # Protocol, "Rare-truths rule, second round"): the main job's budget, the candidate that kept the gains.
    *(Cell(f"{name}-demo", p, "noise", RARE_LOSSES_DEMO, temperature=0.25, seeds=PAIRED_SEEDS, preset="demo",
           rare_class=RARE_CLASS, rare_fraction=0.03, samples=1000, question=f"{question}, at the main job's budget")
      for name, p, question in (("rare-3", 0.0, "Trouser at 3% of clean data"),
                                ("rare-3-noise-0.3", 0.3, "Trouser at 3% beside 30% noise images"))),
]
#: The ablation of the main job's recipe: (what is added, the (cell, loss) without it, the (cell, loss) with it).
ABLATION = (
    ("the adaptive scale (KL, normalised per noise level)", ("demo-tau0.25", "mse"), ("demo-tau1", "kl")),
    ("the divergence (NED instead of KL)", ("demo-tau1", "kl"), ("demo-tau1", "ned")),
    ("temperature 0.25 instead of 1", ("demo-tau1", "ned"), ("demo-tau0.25", "ned")),
    ("per-sample trust", ("demo-tau0.25", "ned"), ("demo-tau0.25", "ned+trust")),
    ("the whole recipe, against the standard MSE", ("demo-tau0.25", "mse"), ("demo-tau0.25", "ned+trust")),
    ("the whole recipe, against pseudo-Huber at the adaptive scale and temperature 0.25",
     ("demo-tau0.25", "pseudo_huber"), ("demo-tau0.25", "ned+trust")),
)
#: Every seed some cell runs.
SEEDS = tuple(sorted({seed for cell in CELLS for seed in cell.seeds}))
#: How the flow-matching cells draw training times (diffusers' SD3 script's default weighting_scheme).
FLOW_SAMPLING = "logit_normal"


def preset_cells(preset: str) -> list:
    """The cells a preset runs. A cell's `steps` is a multiple of the quick budget; another preset trains
    every cell at its own budget, so the cells that only change the steps would repeat their twins."""
    return list(CELLS) if preset == "quick" else [cell for cell in CELLS if cell.steps is None and cell.preset is None]



def kl_cell(cell: Cell) -> Cell:
    """The cell whose `kl` runs a cell is compared with: the adaptive-scale, temperature-1 cell with the same
    data and budget that trains `kl` (itself, when it is one, or when there is none, as for the rare-class cells)."""
    return next((c for c in CELLS if "kl" in c.losses and c.scale == "adaptive" and c.temperature == 1.0
                 and (c.contamination, c.kind, c.steps, c.objective, c.preset, c.rare_class)
                 == (cell.contamination, cell.kind, cell.steps, cell.objective, cell.preset, cell.rare_class)), cell)
