# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Robust diffusion training on contaminated data
#
# **The story.** 30% of a Fashion-MNIST training set is junk: noise images that nobody removed. A diffusion model
# trained with the standard MSE learns the junk with the clothes, and about half of what it generates is noise.
# Swap the loss for a robust one (`robust_diffusion.RobustDiffusionLoss("ned", ...)`) and the same model, on the
# same data, generates far fewer noise images; along the way the loss's influence weights rank the training
# images, and the least-trusted ones are the junk. The cells below show each step: the data, the training, the
# samples of each loss, the numbers, and the audit's least-trusted images.
#
# In general: a fraction *p* of the training images is replaced by outliers (Huber's epsilon-contamination,
# docs/DESIGN.md, Evidence): uniform noise images (`--kind noise`), images with heavy Gaussian noise
# (`--kind gaussian`) or images of another distribution (`--kind dataset`). We train **the same DDPM**
# (same initial weights, data order and diffusion noise) with several losses, all through
# `robust_diffusion.RobustDiffusionLoss`:
#
# | loss | what it does to a sample with a large denoising error |
# |---|---|
# | `mse` | the standard MSE (`kl` at scale 1): full weight, whatever the error |
# | `diffusers_huber` | diffusers' pseudo-Huber loss as diffusers trains it (scale 1, c = 0.1, snr c schedule): caps each pixel's gradient |
# | `kl` | full weight too; the MSE at the adaptive scale, divided by the typical error at its noise level |
# | `hellinger` | per-sample influence weight `exp(-delta/4)` |
# | `ned` | negative exponential disparity: weight falls fastest |
# | `pseudo_huber` | diffusers' pseudo-Huber at the adaptive scale: the strongest baseline a user could configure |
# | `huber` | per-element Huber: caps each pixel's gradient, not the sample's |
# | `clipped_mse` | drops samples whose error exceeds `tau` times the typical one |
#
# `<loss>+debias` adds the 1/sqrt(SNR) timestep weighting of Yu et al.; `<loss>+risk_free` trains with the
# risk-free loss of risk-sensitive diffusion (Li et al.), which uses each sample's known noise level and so
# applies to `--kind gaussian` (e.g. `--kind gaussian --losses kl kl+risk_free ned`). `<loss>+trust` weights
# each training image by its *trust* (`InfluenceTracker.trust`): its influence weights at low noise, where junk
# stands out, applied at every noise level, where it does not (docs/RESULTS.md, finding 11); on a loss whose own
# weights are all 1 (`mse+trust`) the trust is NED's, measured alongside. `+coherent` gates that trust by how
# close an image is to its nearest neighbours, so a rare but coherent group keeps its weight (docs/DESIGN.md,
# Data audit).
#
# Then we sample with DDIM and measure
#
# * the **Frechet distance** between generated and clean test images in the feature space of a small CNN
#   trained on the clean data (`robust_diffusion.training.metrics.FeatureClassifier`; no Inception weights needed);
# * the **fraction of contaminant-like samples**, judged by the same CNN architecture trained to tell clean images
#   from this kind of contaminant, on images that no other network here learns from; beside it the fraction that a
#   second detector, trained with *hybrids* too (noise inside a garment's outline, a noisy half or quarter), calls
#   contaminant;
# * the **AUROC** of a training sample's average influence weight as a detector of contaminated samples
#   (0.5 = no information; plain MSE gives every sample weight 1);
# * the standard **Inception FID** too, when torchmetrics and the Inception weights are already on disk.
#
# Run it as a script (`python examples/cifar10_contaminated.py --dataset fashion-mnist`) or as a notebook
# (`jupytext --to notebook examples/cifar10_contaminated.py`). In a notebook, command-line options can be given in
# the environment variable `RD_EXAMPLE_ARGS`. The Fashion-MNIST `demo` preset (the default, what
# `bash tools/run_example.sh` runs) trains four losses for 1000 steps on a 2-core CPU (how long: docs/MAIN_JOB.md);
# `quick` (250 steps, six losses) is the budget of the evidence in docs/RESULTS.md; the `full` presets are for a
# GPU.

# %%
import argparse
import csv
import math
import os
import platform
import shlex
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# OpenMP threads that busy-wait at barriers slow CPU training several-fold when other processes share the cores;
# passive waiting costs nothing on an idle machine. (Read when torch starts its thread pool: set it first.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import robust_diffusion as rd  # noqa: E402
from robust_diffusion.training import detectors, diversity, metrics  # noqa: E402
from robust_diffusion.training.data import CONTAMINATION_KINDS  # noqa: E402
from robust_diffusion.training.denoising import class_denoising_errors  # noqa: E402
from robust_diffusion.training.export import export_model  # noqa: E402
from robust_diffusion.training.sampling import ddim_sample, flow_sample  # noqa: E402
from robust_diffusion.training.audit_report import score_ranking, write_ranking  # noqa: E402
from robust_diffusion.training.arguments import add_objective_arguments  # noqa: E402
from robust_diffusion.training.experiment import (DATASETS, build_influence_loss, build_loss, build_model,  # noqa: E402
                                                  build_schedule, load_experiment_data, loss_settings,
                                                  parse_loss_name, parse_scale)
from robust_diffusion.training.runlog import read_log
from robust_diffusion.training.trainer import TrainConfig, Trainer  # noqa: E402

IN_JUPYTER = "ipykernel" in sys.modules or sys.argv[0].endswith("ipykernel_launcher.py")
if not IN_JUPYTER:
    import matplotlib
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

START = time.perf_counter()

# %% [markdown]
# ## Settings
#
# A preset fixes the model, the training length and the evaluation sizes for a dataset (and, for `demo`, the
# losses, the temperature and how many runs train at once); any option given on the command line overrides
# it. `demo` and `quick` on Fashion-MNIST are sized for a 2-core CPU: a 0.27M-parameter UNet (no attention),
# 28x28 images, a 2,400-image training subset. The demo's settings were fixed before its runs
# (docs/RESULTS.md, Protocol, "The main job's demo preset"); its divergence losses carry `+trust` since the rule
# "Per-sample trust" was met (finding 12).

# %%
PRESETS = {
    # The main job: the standard MSE, diffusers' pseudo-Huber, the strongest baseline a user could configure
    # (pseudo-Huber at the adaptive scale and temperature 0.25) and the recipe (NED with per-sample trust), long
    # enough that samples look like clothing, two at a time on a 2-core CPU
    # (this small model gains nothing from a second thread: two single-thread runs train twice as fast).
    ("fashion-mnist", "demo"): dict(
        model="quick", model_overrides=dict(attention_levels=()), image_size=28, num_train=2400, steps=1000,
        batch_size=32, lr=2e-3, warmup_steps=20, ema_decay=0.995, samples=400, ddim_steps=10, reference=2000,
        classifier_train=10000, classifier_epochs=1, judge_train=50000, judge_epochs=2, detector_train=2400,
        threads=None,
        losses=["mse", "diffusers_huber", "pseudo_huber", "ned+trust"], temperature=0.25, jobs=2),
    ("fashion-mnist", "quick"): dict(
        model="quick", model_overrides=dict(attention_levels=()), image_size=28, num_train=2400, steps=250,
        batch_size=32, lr=2e-3, warmup_steps=20, ema_decay=0.995, samples=200, ddim_steps=10, reference=2000,
        classifier_train=10000, classifier_epochs=1, judge_train=50000, judge_epochs=2, detector_train=2400,
        threads=None),
    # A seconds-long run that exercises every cell (the tests use it); its numbers mean nothing.
    ("fashion-mnist", "smoke"): dict(
        model="micro", model_overrides={}, image_size=28, num_train=128, steps=3, batch_size=16, lr=1e-3,
        warmup_steps=0, ema_decay=0.9, samples=16, ddim_steps=2, reference=256, classifier_train=512,
        classifier_epochs=1, judge_train=512, judge_epochs=1, detector_train=128, threads=None),
    ("fashion-mnist", "full"): dict(
        model="small", model_overrides={}, image_size=32, num_train=None, steps=20000, batch_size=128, lr=2e-4,
        warmup_steps=500, ema_decay=0.9995, samples=10000, ddim_steps=100, reference=10000,
        classifier_train=None, classifier_epochs=2, judge_train=None, judge_epochs=4, detector_train=20000,
        threads=None),
    ("cifar10", "quick"): dict(
        model="tiny", model_overrides={}, image_size=32, num_train=10000, steps=2000, batch_size=64, lr=1e-3,
        warmup_steps=100, ema_decay=0.999, samples=1000, ddim_steps=25, reference=2000,
        classifier_train=20000, classifier_epochs=2, judge_train=40000, judge_epochs=4, detector_train=10000,
        threads=None),
    ("cifar10", "full"): dict(
        model="ddpm_cifar10", model_overrides={}, image_size=32, num_train=None, steps=100000, batch_size=128,
        lr=2e-4, warmup_steps=5000, ema_decay=0.9999, samples=10000, ddim_steps=100, reference=10000,
        classifier_train=None, classifier_epochs=10, judge_train=None, judge_epochs=10, detector_train=20000,
        threads=None),
}
#: What a preset that does not say trains: the losses, the adaptive scale's temperature, runs at a time.
PRESET_DEFAULTS = dict(losses=["mse", "kl", "hellinger", "ned", "huber", "clipped_mse"], temperature=1.0, jobs=1)
PRESET_NAMES = ("demo", "quick", "full", "smoke")


def build_parser():
    parser = argparse.ArgumentParser(description="Train one DDPM per loss on contaminated data and compare them.")
    parser.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    parser.add_argument("--data-root", default=None, help="dataset directory (required for CIFAR-10)")
    parser.add_argument("--download", action="store_true",
                        help="CIFAR-10: download it into --data-root if it is not there (needs network)")
    parser.add_argument("--contamination", type=float, default=0.3, help="contaminated fraction p in [0, 1)")
    parser.add_argument("--kind", choices=CONTAMINATION_KINDS, default="noise")
    parser.add_argument("--rare-class", type=int, default=None,
                        help="a control: make this class legitimately rare in the training images (its share of "
                             "samples and its influence are then reported)")
    parser.add_argument("--rare-fraction", type=float, default=0.03, help="the rare class's share of the training images")
    parser.add_argument("--losses", nargs="+", default=None,
                        help="loss names, optionally +weighting, +risk_free, +trust (e.g. ned+debias) (default: preset)")
    parser.add_argument("--preset", choices=PRESET_NAMES, default=None,
                        help="demo (the default where there is one: the main job), quick (the evidence's budget): "
                             "minutes on a CPU; full: a GPU run; smoke: seconds, for tests")
    parser.add_argument("--steps", type=int, default=None, help="training steps per loss (default: preset)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--num-train", type=int, default=None, help="training images (default: preset)")
    parser.add_argument("--samples", type=int, default=None, help="generated samples per loss (default: preset)")
    parser.add_argument("--ddim-steps", type=int, default=None)
    parser.add_argument("--scale", default="adaptive", help="RobustDiffusionLoss scale: adaptive, vlb, batch or a number")
    add_objective_arguments(parser)  # --objective flow samples with Euler, as many model calls as DDIM's
    parser.add_argument("--temperature", type=float, default=None, help="the adaptive scale's tau (default: preset)")
    parser.add_argument("--trust-low-noise", type=float, default=0.5,
                        help="+trust losses: measure the trust on the draws with t below this fraction of the "
                             "timesteps, in (0, 1]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--out", default="outputs/contaminated")
    parser.add_argument("--eval-train", type=int, default=None,
                        help="at most this many images for each evaluation network (the feature classifier, the "
                             "class judge, the detectors; default: preset): a quick look, not comparable numbers")
    parser.add_argument("--eval-cache", default=None,
                        help="where the evaluation networks are cached (default: <out>/cache); share it between "
                             "runs so that every run is judged by the same networks")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; with --jobs above 1, the cores shared out)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="losses training at a time, in threads (default: preset; results do not depend on it)")
    parser.add_argument("--no-export", action="store_true", help="skip the TorchScript / torch.export step")
    parser.add_argument("--export-loss", default=None,
                        help="whose EMA model to export (default: the first NED run, else the last loss)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse finished runs in --out and continue interrupted ones from their last checkpoint "
                             "(each run writes one every tenth of its steps)")
    return parser


PARSER = build_parser()


def parse_args(argv=None):
    parser = PARSER
    if argv is None:
        # A Jupyter kernel's own argv (-f kernel.json) is not ours; options come from RD_EXAMPLE_ARGS there.
        argv = [] if IN_JUPYTER else sys.argv[1:]
        argv = argv + shlex.split(os.environ.get("RD_EXAMPLE_ARGS", ""))
    args = parser.parse_args(argv)
    if args.preset is None:
        args.preset = "demo" if (args.dataset, "demo") in PRESETS else "quick"
    if (args.dataset, args.preset) not in PRESETS:
        parser.error(f"there is no {args.preset!r} preset for {args.dataset}")
    settings = {**PRESET_DEFAULTS, **PRESETS[(args.dataset, args.preset)]}
    for key in ("steps", "batch_size", "num_train", "samples", "ddim_steps", "threads", "losses", "temperature",
                "jobs"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.eval_train is not None:
        if args.eval_train < 1:
            parser.error(f"--eval-train must be at least 1, got {args.eval_train}")
        for key in ("classifier_train", "judge_train", "detector_train"):
            settings[key] = min(settings[key] or args.eval_train, args.eval_train)
    args.losses, args.temperature = settings["losses"], settings["temperature"]
    try:
        args.specs = [parse_loss_name(name) for name in args.losses]
        if len({spec.name for spec in args.specs}) != len(args.specs):
            raise ValueError(f"--losses names a loss twice: {' '.join(args.losses)}")
        parse_scale(args.scale)
        args.schedule = build_schedule(args.objective, args.shift, args.timestep_sampling)
        if any(spec.risk_free for spec in args.specs) and args.objective != "ddpm":
            raise ValueError("+risk_free trains DDPM steps (--objective ddpm)")
        if not 0.0 <= args.contamination < 1.0:
            raise ValueError(f"contamination must be a fraction in [0, 1), got {args.contamination!r}")
        if not args.temperature > 0:
            raise ValueError(f"--temperature must be positive, got {args.temperature!r}")
        if not 0 < args.trust_low_noise <= 1:
            raise ValueError(f"--trust-low-noise must be a fraction of the timesteps in (0, 1], got "
                             f"{args.trust_low_noise!r}")
        for key in ("jobs", "threads"):
            if settings[key] is not None and settings[key] < 1:
                raise ValueError(f"--{key} must be at least 1, got {settings[key]!r}")
    except ValueError as error:
        parser.error(str(error))
    settings["jobs"] = min(settings["jobs"], len(args.specs))
    if settings["jobs"] > 1 and not settings["threads"]:
        settings["threads"] = max(1, (os.cpu_count() or 1) // settings["jobs"])
    args.settings = settings
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return args


args = parse_args()
settings = args.settings
OUT = Path(args.out)
OUT.mkdir(parents=True, exist_ok=True)
if settings["threads"]:
    torch.set_num_threads(settings["threads"])
print(f"dataset {args.dataset}, p = {args.contamination}, kind {args.kind}, objective {args.objective}, preset {args.preset}, "
      f"losses {[s.name for s in args.specs]}, device {args.device}, out {OUT}")
print("settings:", {k: v for k, v in settings.items() if k != "model_overrides"})

# %% [markdown]
# ## Data
#
# The contaminated training set keeps the ground truth: which samples were replaced.

# %%
def load_data(contamination, **options):
    """``load_experiment_data`` of this run's dataset, kind, --data-root and --download; a missing or unreadable
    dataset stops the example with a usage error (exit code 2), as a bad option does."""
    try:
        return load_experiment_data(args.dataset, contamination, args.kind, root=args.data_root,
                                    download=args.download, **options)
    except (ValueError, OSError, ImportError, RuntimeError) as error:
        hint = (" (or pass --download to fetch it)"
                if args.dataset == "cifar10" and not args.download and isinstance(error, FileNotFoundError) else "")
        PARSER.error(f"{error}{hint}")


data = load_data(args.contamination, num_train=settings["num_train"], image_size=settings["image_size"],
                 seed=args.seed, rare_class=args.rare_class, rare_fraction=args.rare_fraction)
train_set = data.train
print(data.description)
image_shape = data.image_shape
is_contaminated = train_set.is_contaminated.cpu()


def image_grid(images, columns=None):
    """[N, C, H, W] in [-1, 1] -> an [H', W', C] array in [0, 1] for imshow."""
    images = images[:64].detach().cpu().float().clamp(-1, 1).add(1).div(2)
    n, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = torch.ones(c, rows * (h + 2) + 2, columns * (w + 2) + 2)
    for i in range(n):
        top, left = 2 + (i // columns) * (h + 2), 2 + (i % columns) * (w + 2)
        grid[:, top:top + h, left:left + w] = images[i]
    grid = grid.permute(1, 2, 0)
    return grid.squeeze(-1) if c == 1 else grid


panels = [(False, "clean training images")] + ([(True, "contaminated training images")] if is_contaminated.any() else [])
fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
for ax, (flag, title) in zip(axes[0], panels):
    ax.imshow(image_grid(train_set.images[is_contaminated == flag][:36]), cmap="gray", vmin=0, vmax=1)
    ax.set_title(title)
    ax.axis("off")
fig.tight_layout()
fig.savefig(OUT / "training_data.png", dpi=120)
plt.show() if IN_JUPYTER else plt.close(fig)

# %% [markdown]
# ## Evaluation networks
#
# A small CNN trained on clean images provides the feature space of the Frechet distance; a second one,
# trained to tell clean images from the contaminant, judges how many generated samples look like the
# contaminant; a third, trained with hybrids of clean images and the contaminant among the contaminants, judges
# the samples that are part garment, part junk. All are fixed in advance (seed 0, independent of `--seed` and
# `--contamination`), so runs that share `--eval-cache` are judged by the same networks.

# %%
EVAL_SEED = 0
eval_cache = Path(args.eval_cache) if args.eval_cache else OUT / "cache"
# --kind dataset removes the held-out classes from every split, so its classifiers have fewer classes: cached apart.
CLASSES_TAG = "_held_out_removed" if args.kind == "dataset" else ""
t0 = time.perf_counter()
# The classifier learns from clean training images (the uncontaminated originals of the same split, with
# the held-out classes of --kind dataset removed), possibly beyond the diffusion model's subset.
clean = load_data(0.0, image_size=settings["image_size"], num_train=settings["classifier_train"])
cls_images, cls_labels = clean.train.images, clean.train_labels
classifier = metrics.train_classifier(
    cls_images, cls_labels, test_images=data.test_images, test_labels=data.test_labels,
    epochs=settings["classifier_epochs"], seed=EVAL_SEED,
    cache_path=eval_cache / f"classifier{CLASSES_TAG}.safetensors",
    device=args.device, progress=not IN_JUPYTER)
# The detectors learn from their own half-contaminated draw of this kind of contaminant, made from the last
# `detector_train` images of the training split, while the diffusion models train on the first `num_train` and
# the classifier on the first `classifier_train`. A detector that learned the diffusion models' own training
# images as "clean" would call a model that reproduces them clean because it saw those very images, not because
# they look clean; held-out images rule that out. (The full presets train on the whole split, so there the
# overlap is counted and reported.)
half = load_data(0.5, image_size=settings["image_size"], num_train=settings["detector_train"], seed=EVAL_SEED,
                 from_end=True)
detector_shared = detectors.count_shared(half.train_indices, settings["num_train"], settings["classifier_train"])
# The hybrids: noise (for --kind gaussian: the kind's Gaussian noise) inside a garment's outline, and the kind's
# contaminant over a random half or quarter; --kind dataset and CIFAR-10 (no plain background) get the partial
# ones only (detectors.hybrid_styles).
hybrid_styles = detectors.hybrid_styles(args.dataset, args.kind)
trained_detectors = detectors.train_detectors(half.train, hybrid_styles, seed=EVAL_SEED, epochs=3,
                                              cache_dir=eval_cache, device=args.device, progress=not IN_JUPYTER)
detector, hybrid_detector = trained_detectors.pure, trained_detectors.hybrid
# The class judge decides which class a sample shows (the class histograms, the rare-class control). The feature
# classifier is kept as it is, so FD stays comparable with earlier runs, but one epoch on 10,000 images leaves it
# too unsure for per-class shares; the judge is the same network trained longer on more clean images.
# It trains on every core: nothing else runs yet (the feature classifier keeps the thread count its FDs came from).
judge_data = load_data(0.0, image_size=settings["image_size"], num_train=settings["judge_train"])
threads_before = torch.get_num_threads()
torch.set_num_threads(max(threads_before, os.cpu_count() or 1))
judge = metrics.train_classifier(
    judge_data.train.images, judge_data.train_labels, test_images=data.test_images, test_labels=data.test_labels,
    epochs=settings["judge_epochs"], seed=EVAL_SEED,
    cache_path=eval_cache / f"class_judge{CLASSES_TAG}.safetensors",
    device=args.device, progress=not IN_JUPYTER)
torch.set_num_threads(threads_before)
reference = data.test_images[:settings["reference"]]
reference_labels = data.test_labels[:settings["reference"]]
reference_features = metrics.extract_features(classifier.model, reference)
eval_seconds = time.perf_counter() - t0
print(f"feature classifier: FeatureClassifier (0.16M-parameter CNN, {cls_images.shape[0]} clean images, "
      f"{settings['classifier_epochs']} epoch(s)), test accuracy {classifier.test_accuracy:.3f}")
print(f"class judge: the same network, {judge_data.train.images.shape[0]} clean images, {settings['judge_epochs']} "
      f"epoch(s), test accuracy {judge.test_accuracy:.3f}")


def recall_text(which):
    recall = trained_detectors.recall[which]
    return ", ".join(f"{style} {recall[style]:.3f}" for style in hybrid_styles)


print(f"contaminant detectors ({args.kind}): {half.description}"
      + (f"; {detector_shared} of them also train the diffusion models or the classifier" if detector_shared else ""))
for which, trained_detector in (("pure", detector), ("hybrid", hybrid_detector)):
    print(f"  {'pure-contaminant' if which == 'pure' else 'hybrid-aware'} detector: held-out accuracy "
          f"{trained_detector.test_accuracy:.3f}, recall on {trained_detectors.num_hybrids} held-out hybrids: "
          f"{recall_text(which)}")
# The standard Inception FID as well, when torchmetrics and the Inception weights are already on disk.
INCEPTION = metrics.inception_weights_available()
print("Inception FID:", "on" if INCEPTION else "off (needs torchmetrics, torch-fidelity and the Inception weights "
      "in torch.hub's cache; nothing is downloaded)")
print(f"({eval_seconds:.0f} s)")


NUM_CLASSES = int(cls_labels.max()) + 1
# The class histogram generated samples are compared with: the clean training images' (contaminants have none).
training_shares = diversity.label_shares(data.train_labels[~is_contaminated], NUM_CLASSES)


def evaluate_images(images):
    """Frechet distance to the clean test images, contaminant fraction under both detectors (and each image's
    probability under each), precision/recall/density/coverage in the same features (k = 5) and the class
    histogram (its total variation from the training set's)."""
    features = metrics.extract_features(classifier.model, images)
    shares = diversity.class_shares(judge.model, images, NUM_CLASSES)
    probability = {"contaminant": detectors.contaminant_probability(detector.model, images),
                   "contaminant_hybrid": detectors.contaminant_probability(hybrid_detector.model, images)}
    return {"frechet_distance": metrics.frechet_distance(features, reference_features),
            # the rule of metrics.contaminant_fraction: the share of images with probability above 0.5
            "contaminant_fraction": (probability["contaminant"] > 0.5).float().mean().item(),
            "contaminant_fraction_hybrid": (probability["contaminant_hybrid"] > 0.5).float().mean().item(),
            "detector_probability": probability,
            **diversity.manifold_metrics(reference_features, features, k=5),
            "class_tv": diversity.total_variation(shares.argmax, training_shares), "shares": shares}


# The real data as references: what a perfect model of the clean data, and of the contaminated training
# distribution, would score with the same number of samples.
n_samples = settings["samples"]
generator = torch.Generator().manual_seed(args.seed)
pick_clean = torch.randperm(int((~is_contaminated).sum()), generator=generator)[:n_samples]
pick_all = torch.randperm(len(train_set), generator=generator)[:n_samples]
reference_rows = []
for name, images in (("data: clean training images", train_set.images[~is_contaminated][pick_clean]),
                     ("data: contaminated training set", train_set.images[pick_all])):
    reference_rows.append({"loss": name, **evaluate_images(images)})
    print(f"{name}: Frechet distance {reference_rows[-1]['frechet_distance']:.2f}, contaminant fraction "
          f"{reference_rows[-1]['contaminant_fraction']:.3f} (hybrid-aware "
          f"{reference_rows[-1]['contaminant_fraction_hybrid']:.3f}), coverage {reference_rows[-1]['coverage']:.3f}")

# %% [markdown]
# ## Training, sampling, evaluation
#
# Every loss trains the same network from the same initial weights on the same batches with the same
# diffusion noise, so the differences come from the loss alone. The `Trainer` logs the mean influence weight
# of clean and contaminated samples and keeps each training sample's average weight. Each run writes a checkpoint
# every tenth of its steps into `<out>/runs/<loss>`: `--resume` continues an interrupted run from there (exactly,
# on the CPU) and reuses a finished one.
#
# With `--jobs 2` (the demo's) two losses train at a time, each in its own thread: every run has its own
# generators, so its numbers are those of a run alone (tested), and on a 2-core CPU this halves the time.

# %%
schedule = args.schedule  # DDPM's linear NoiseSchedule, or flow matching with --objective flow
SAMPLE_CHUNK = 500
influence_from = settings["steps"] // 5  # the first steps, with an untrained model, say little about outliers
checkpoint_every = max(1, settings["steps"] // 10)  # what --resume continues from; saving changes no result


def make_trainer(spec):
    """A fresh (or, with --resume, continued) run of one loss. Built one after another in this thread: the model's
    initial weights and the Trainer draw from torch's global RNG."""
    run_dir = OUT / "runs" / spec.name
    if not args.resume and run_dir.exists():
        shutil.rmtree(run_dir)
    torch.manual_seed(args.seed)
    model = build_model(settings["model"], image_shape[0], **settings["model_overrides"])
    loss_fn = build_loss(spec, schedule, scale=args.scale, temperature=args.temperature)
    config = TrainConfig(steps=settings["steps"], batch_size=settings["batch_size"], lr=settings["lr"],
                         warmup_steps=settings["warmup_steps"], ema_decay=settings["ema_decay"],
                         log_every=max(1, settings["steps"] // 30), checkpoint_every=checkpoint_every,
                         influence_from_step=influence_from, risk_free=spec.risk_free,
                         sample_trust=spec.trust, trust_coherence=spec.coherent,
                         trust_low_noise=args.trust_low_noise if spec.trust else 0.5, seed=args.seed,
                         progress=not IN_JUPYTER, progress_label=spec.name)
    trainer = Trainer(model, loss_fn, train_set, schedule, config, out_dir=run_dir, device=args.device,
                      influence_loss=build_influence_loss(spec, schedule, temperature=args.temperature))
    if args.resume and trainer.resume():
        print(f"{spec.name}: resumed at step {trainer.step}")
    elif trainer.log_path.is_file():
        trainer.log_path.unlink()  # left by a run killed before its first checkpoint: start a fresh log
    print(f"--- {spec.name} ({loss_settings(loss_fn)}): {sum(p.numel() for p in model.parameters()):,} parameters")
    return trainer


def timed_training(trainer):
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


trainers = {spec.name: make_trainer(spec) for spec in args.specs}
jobs = settings["jobs"]
if jobs > 1 and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for t in trainers.values() for m in t.model.modules()):
    PARSER.error("--jobs above 1 needs a model without dropout: dropout draws from torch's global RNG, which runs "
                 "training at once would share (their results would depend on timing)")
print(f"training {len(trainers)} loss(es), {jobs} at a time, {torch.get_num_threads()} torch thread(s)")
with ThreadPoolExecutor(max_workers=jobs) as pool:
    futures = {name: pool.submit(timed_training, trainer) for name, trainer in trainers.items()}
    try:
        train_seconds = {name: future.result() for name, future in futures.items()}
    except BaseException:  # Ctrl-C or a failed run: the others stop after their current step, with a checkpoint
        pool.shutdown(wait=False, cancel_futures=True)
        for trainer in trainers.values():
            trainer.stop()
        raise

def rare_class_row(model, shares, mean_influence, seen):
    """With --rare-class: the rare class's share of the samples (argmax and confident); how much less the loss
    trusted its clean training images than the other clean ones (AUROC of a low mean influence as a detector of
    the rare class: 0.5, no difference); and how well the model learnt the class whatever its samples look like:
    its denoising error on the rare class's test images over that on the other classes' (the same noise for
    every loss; 1: learnt as well as the rest)."""
    if args.rare_class is None:
        return {}
    clean = seen & ~is_contaminated
    is_rare = (data.train_labels == args.rare_class).cpu() & clean
    separable = bool(is_rare.any()) and bool((clean & ~is_rare).any())
    errors = class_denoising_errors(model, schedule, reference, reference_labels, NUM_CLASSES, seed=EVAL_SEED,
                                    device=args.device)
    others = torch.cat([errors[:args.rare_class], errors[args.rare_class + 1:]])
    return {"rare_share": shares.argmax[args.rare_class].item(),
            "rare_confident": shares.confident[args.rare_class].item(),
            "rare_auroc": metrics.auroc(-mean_influence[clean], is_rare[clean]) if separable else math.nan,
            "rare_error_ratio": (errors[args.rare_class] / others.nanmean()).item()}


results, trained = [], {}
for spec in args.specs:
    trainer, run_dir = trainers[spec.name], OUT / "runs" / spec.name
    t0 = time.perf_counter()
    sample_generator = torch.Generator(args.device).manual_seed(args.seed)
    sampler = ddim_sample if schedule.discrete else flow_sample  # flow: Euler, as many model calls as DDIM
    samples = torch.cat([  # in chunks, so that the full presets' 10,000 samples fit in GPU memory
        sampler(trainer.ema, schedule, (min(SAMPLE_CHUNK, n_samples - start), *image_shape),
                num_steps=settings["ddim_steps"], generator=sample_generator, device=args.device).cpu()
        for start in range(0, n_samples, SAMPLE_CHUNK)])
    samples = samples.clamp(-1, 1)  # images (DDIM clamps its x0 estimates; an ODE sampler does not)
    sample_seconds = time.perf_counter() - t0
    evaluation = evaluate_images(samples)
    fd, fraction = evaluation["frechet_distance"], evaluation["contaminant_fraction"]
    mean_influence, count = trainer.average_influence()
    seen = count > 0
    auroc = (metrics.auroc(-mean_influence[seen], is_contaminated[seen])
             if is_contaminated[seen].any() and (~is_contaminated[seen]).any() else math.nan)
    log = read_log(trainer.log_path)
    row = {"loss": spec.name, "weighting": spec.weighting, "settings": loss_settings(trainer.loss_fn),
           "steps": settings["steps"], "final_penalty": log[-1]["penalty"],
           "influence_clean": mean_influence[seen & ~is_contaminated].mean().item(),
           "influence_contaminated": mean_influence[seen & is_contaminated].mean().item(),
           **rare_class_row(trainer.ema, evaluation["shares"], mean_influence, seen),
           "auroc": auroc, **evaluation,
           "inception_fid": metrics.inception_fid(samples, reference, device=args.device) if INCEPTION else None,
           "train_s": train_seconds[spec.name], "sample_s": sample_seconds}
    results.append(row)
    trained[spec.name] = dict(trainer=trainer, samples=samples, mean_influence=mean_influence, seen=seen, log=log)
    save_file({"samples": samples.contiguous()}, run_dir / "samples.safetensors")
    # Each sample's probability and call under both detectors, in the order of samples.safetensors.
    detectors.write_calls(run_dir / "detector_calls.csv", evaluation["detector_probability"])
    print(f"{spec.name}: FD {fd:.2f}, contaminant fraction {fraction:.3f} "
          f"(hybrid-aware {evaluation['contaminant_fraction_hybrid']:.3f}), coverage {evaluation['coverage']:.3f}, "
          f"AUROC {auroc:.3f}, "
          f"train {train_seconds[spec.name]:.0f} s, sampling {sample_seconds:.0f} s")

# %% [markdown]
# ## Results

# %%
COLUMNS = ["loss", "weighting", "settings", "steps", "final_penalty", "influence_clean", "influence_contaminated",
           "auroc", "frechet_distance", "contaminant_fraction", "contaminant_fraction_hybrid", "precision", "recall",
           "density", "coverage", "class_tv", "inception_fid", "train_s", "sample_s", "classifier_accuracy",
           "judge_accuracy"]
if args.rare_class is not None:  # the rare-class control's columns, for the data rows too
    COLUMNS += ["rare_share", "rare_confident", "rare_auroc", "rare_error_ratio"]
    for row in reference_rows:
        row.update(rare_share=row["shares"].argmax[args.rare_class].item(),
                   rare_confident=row["shares"].confident[args.rare_class].item())


def fmt(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


rows = results + reference_rows
for row in rows:  # the evaluation networks' test accuracy on every row, so tables built from the rows can say it
    row.update(classifier_accuracy=classifier.test_accuracy, judge_accuracy=judge.test_accuracy)
with open(OUT / "results.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: fmt(row.get(k)) for k in COLUMNS})
# The class histograms: for each loss (and the data), the share of its images the feature classifier assigns to
# each class (argmax) and assigns with probability above 0.9, beside the clean training set's shares.
with open(OUT / "class_shares.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["loss", "class", "share", "confident_share", "training_share"])
    for row in rows:
        for k in range(NUM_CLASSES):
            writer.writerow([row["loss"], k, f"{row['shares'].argmax[k]:.4f}", f"{row['shares'].confident[k]:.4f}",
                             f"{training_shares[k]:.4f}"])
accuracy = f"{classifier.test_accuracy:.3f}"
split_size = int(half.train_indices[-1]) + 1
first = {key: "all" if settings[key] is None else f"the first {settings[key]}"
         for key in ("num_train", "classifier_train")}
detector_images = (f"the last {len(half.train)} of its {split_size}, "
                   + (f"of which {detector_shared}" if detector_shared else "none of which")
                   + f" the diffusion models ({first['num_train']}) or the classifier ({first['classifier_train']}) "
                   "train on")
contaminant_words = {"noise": "uniform noise", "gaussian": "the kind's Gaussian noise added",
                     "dataset": "the pixels of a contaminant image"}[args.kind]
hybrid_words = "; ".join(
    {"silhouette": f"silhouette: {contaminant_words} on the pixels that differ from the background, which is kept",
     "partial": f"partial: {contaminant_words} over a random half or quarter"}[style] for style in hybrid_styles)
if "silhouette" not in hybrid_styles:
    hybrid_words += ("; no silhouette hybrids: another distribution's images are no noise to put inside a garment's "
                     "outline" if args.kind == "dataset" else
                     "; no silhouette hybrids: these images have no plain background to find an outline against")
machine = (torch.cuda.get_device_name(args.device) if args.device.type == "cuda"
           else f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s)")
header = [f"# Robust DDPM training on contaminated data", "",
          f"- machine: {machine}, torch {torch.__version__}",
          f"- data: {data.description}",
          f"- model: UNet preset `{settings['model']}` {settings['model_overrides'] or ''}, {settings['steps']} steps, "
          f"batch {settings['batch_size']}, AdamW lr {settings['lr']}, EMA {settings['ema_decay']}, seed {args.seed}",
          f"- sampling: DDIM, {settings['ddim_steps']} steps, eta 0, {n_samples} samples per loss",
          f"- Frechet distance: FeatureClassifier features (128-d, test accuracy {accuracy}) against "
          f"{reference.shape[0]} clean test images",
          f"- contaminant_fraction: the share of the images a FeatureClassifier calls contaminant (probability above "
          f"0.5). It learned to tell clean images from `{args.kind}` contaminants on {trained_detectors.num_train} "
          f"half-contaminated images from the end of the training split, {detector_images}; held-out accuracy "
          f"{detector.test_accuracy:.3f} on the other {trained_detectors.num_test}, recall (share called contaminant) "
          f"on {trained_detectors.num_hybrids} hybrids of the held-out clean images: {recall_text('pure')}",
          f"- contaminant_fraction_hybrid: the same network trained with one hybrid of each of its clean images among "
          f"the contaminants ({hybrid_words}); held-out accuracy {hybrid_detector.test_accuracy:.3f}, recall on the "
          f"same hybrids: {recall_text('hybrid')}. Each generated sample's probability and call under both "
          f"detectors: `runs/<loss>/detector_calls.csv`",
          f"- AUROC: average influence weight of each training sample (steps >= {influence_from}) as a detector "
          f"of the contaminated ones; influence columns: mean of those averages over clean / contaminated samples",
          "- precision, recall, density, coverage: k-nearest-neighbour balls (k = 5) of the same features against "
          "the same test images (docs/DESIGN.md, Evidence); class_tv: total variation between the class judge's "
          f"histogram of the images and the clean training set's (per class, argmax and with probability above 0.9: "
          f"class_shares.csv); the judge: the feature classifier's network trained on "
          f"{judge_data.train.images.shape[0]} clean images for {settings['judge_epochs']} epoch(s), test accuracy "
          f"{judge.test_accuracy:.3f}",
          "- final_penalty: mean per-sample denoising penalty R_b (squared error; Huber penalty for huber) over "
          "the last log interval, on the contaminated training data",
          ""]
table = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
table += ["| " + " | ".join(fmt(row.get(k)) for k in COLUMNS) + " |" for row in rows]
(OUT / "results.md").write_text("\n".join(header + table) + "\n")
print("\n".join(table))

# %% [markdown]
# ## Figures: samples, influence weights, training curves

# %%
names = list(trained)
fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 4.0), squeeze=False)
for ax, name in zip(axes[0], names):
    ax.imshow(image_grid(trained[name]["samples"][:36]), cmap="gray", vmin=0, vmax=1)
    row = next(r for r in results if r["loss"] == name)
    ax.set_title(f"{name}\nFD {row['frechet_distance']:.1f}, contam. {row['contaminant_fraction']:.2f}", fontsize=9)
    ax.axis("off")
fig.tight_layout()
fig.savefig(OUT / "samples.png", dpi=120)
plt.show() if IN_JUPYTER else plt.close(fig)
for name in names:
    plt.imsave(OUT / f"samples_{name}.png", image_grid(trained[name]["samples"]).numpy(), cmap="gray", vmin=0, vmax=1)

fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False, sharey=True)
for ax, name in zip(axes[0], names):
    weights, seen = trained[name]["mean_influence"], trained[name]["seen"]
    bins = torch.linspace(0, max(1.0, float(weights[seen].max())), 31).tolist()
    ax.hist(weights[seen & ~is_contaminated].numpy(), bins=bins, alpha=0.6, density=True, label="clean")
    ax.hist(weights[seen & is_contaminated].numpy(), bins=bins, alpha=0.6, density=True, label="contaminated")
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("average influence weight")
axes[0][0].legend(fontsize=8)
fig.tight_layout()
fig.savefig(OUT / "influence_histograms.png", dpi=120)
plt.show() if IN_JUPYTER else plt.close(fig)

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for name in names:
    log = trained[name]["log"]
    steps = [r["step"] for r in log]
    axes[0].plot(steps, [r["penalty"] for r in log], label=name)
    line, = axes[1].plot(steps, [r["influence_clean"] for r in log], label=f"{name} clean")
    axes[1].plot(steps, [r["influence_contaminated"] for r in log], "--", color=line.get_color(),
                 label=f"{name} contaminated")
axes[0].set(xlabel="step", ylabel="mean per-sample penalty R_b", yscale="log",
            title="denoising error (squared error; Huber: Huber penalty)")
axes[1].set(xlabel="step", ylabel="mean influence weight", title="influence: clean (solid), contaminated (dashed)")
axes[0].legend(fontsize=8)
fig.tight_layout()
fig.savefig(OUT / "loss_curves.png", dpi=120)
plt.show() if IN_JUPYTER else plt.close(fig)

# %% [markdown]
# ## The audit: which training images did the robust loss trust least?
#
# Every run's `trainer.influence` (a `robust_diffusion.InfluenceTracker`) kept each training image's average
# influence weight. Ranked lowest first, they are the images the loss trusted least: what
# `python -m robust_diffusion.audit DATA --out DIR` does for a folder of your own images (docs/AUDIT.md). Here we
# know which images are junk, so the ranking gets a score: the precision at k (k = the number of contaminated
# images: the fraction of junk among the k least trusted) and the AUROC, next to the simple baseline that ranks
# by each image's mean denoising error.

# %%
losses_of = {name: trained[name]["trainer"].loss_fn for name in names}
divergences = [name for name, fn in losses_of.items()  # bounded influence, at a scale that follows the data
               if fn.loss in rd.DIVERGENCES and fn.loss not in ("kl", "chi2") and fn.scale_mode != "fixed"]
audit_name = next((name for name in divergences if losses_of[name].loss == "ned"), next(iter(divergences), None))
audit = None
if audit_name is None:
    print("no audit: it needs a bounded-influence divergence loss at a data-dependent scale (e.g. ned, hellinger)")
elif not is_contaminated.any():
    print("no audit score: nothing in the training set is contaminated")
else:
    audit_table = trained[audit_name]["trainer"].influence.table()
    write_ranking(OUT / f"audit_ranking_{audit_name}.csv", audit_table)
    audit = score_ranking(audit_table, is_contaminated)
    least_trusted = torch.tensor([row["index"] for row in audit_table[:48]])
    audit["shown"] = len(least_trusted)
    audit["shown_contaminated"] = int(is_contaminated[least_trusted].sum())
    print(f"audit by {audit_name}'s influence weights: {audit['summary']}; of the {audit['shown']} least-trusted "
          f"images, {audit['shown_contaminated']} are contaminated")
    fig, ax = plt.subplots(figsize=(6, 4.6))
    ax.imshow(image_grid(train_set.images[least_trusted], columns=8), cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"{audit_name}: the {audit['shown']} least-trusted training images "
                 f"({audit['shown_contaminated']} contaminated)\nprecision at k={audit['flagged']}: "
                 f"{audit['precision_at_k']:.2f}, AUROC {audit['auroc']:.3f}", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(OUT / "audit_least_trusted.png", dpi=120)
    plt.show() if IN_JUPYTER else plt.close(fig)
    with open(OUT / "results.md", "a") as f:
        f.write(f"\nAudit (the training images ranked by {audit_name}'s mean influence weight, least trusted first, "
                f"`audit_ranking_{audit_name}.csv`): {audit['summary']}; {audit['shown_contaminated']} of the "
                f"{audit['shown']} least-trusted images are contaminated (`audit_least_trusted.png`).\n")

# %% [markdown]
# Why a robust loss still learns some junk: the influence weight is given per sample *and noise level*. At
# low noise a junk image is far harder to denoise than a garment and gets a small weight; at high noise every
# image is mostly noise, the junk's error is typical, and it keeps nearly full weight, and the high noise levels
# are where a sample's coarse content (garment or junk) is decided. The mean weight per noise-level bucket,
# clean against contaminated training images (with `+trust` the junk's low-noise weights, where they separate,
# scale its loss at every noise level: docs/RESULTS.md, findings 11 and 12):

# %%
if audit is not None:
    tracker = trained[audit_name]["trainer"].influence
    per_bucket = tracker.mean_influence(per_bucket=True)
    if tracker.num_timesteps is not None:  # discrete steps: equal ranges of t
        edges = torch.linspace(0, tracker.num_timesteps, tracker.num_buckets + 1).round().long().tolist()
        spans, level = [f"{edges[b]}-{edges[b + 1] - 1}" for b in range(tracker.num_buckets)], "t"
        centres = [(edges[b] + edges[b + 1]) / 2 for b in range(tracker.num_buckets)]
    else:  # continuous time (flow matching): equal ranges of log-SNR, from the least noisy
        low, high = rd.BUCKET_LOG_SNR_RANGE
        edges = torch.linspace(high, low, tracker.num_buckets + 1).tolist()
        spans, level = [f"{edges[b]:.0f} to {edges[b + 1]:.0f}" for b in range(tracker.num_buckets)], "log-SNR"
        centres = [-(edges[b] + edges[b + 1]) / 2 for b in range(tracker.num_buckets)]
    bucket_rows = []
    for b in range(tracker.num_buckets):
        clean_b, junk_b = per_bucket[~is_contaminated, b], per_bucket[is_contaminated, b]
        clean_b, junk_b = clean_b[~clean_b.isnan()].mean().item(), junk_b[~junk_b.isnan()].mean().item()
        bucket_rows.append((spans[b], clean_b, junk_b))
    lines = [f"| {level} | clean | contaminated | ratio |", "|---|---|---|---|"]
    lines += [f"| {span} | {c:.3f} | {j:.3f} | {j / c:.2f} |" for span, c, j in bucket_rows]
    print("\n".join(lines))
    with open(OUT / "results.md", "a") as f:
        f.write(f"\nMean influence weight of {audit_name} per noise level (ratio: contaminated / clean):\n\n"
                + "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(centres, [c for _, c, _ in bucket_rows], "o-", label="clean")
    ax.plot(centres, [j for _, _, j in bucket_rows], "s--", label="contaminated")
    ax.set(xlabel="timestep t (noise level)" if level == "t" else "minus log-SNR (noise level)",
           ylabel="mean influence weight", title=f"{audit_name}: who is trusted, by noise level")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "influence_by_noise_level.png", dpi=120)
    plt.show() if IN_JUPYTER else plt.close(fig)

# %% [markdown]
# ## The picture
#
# What the training set looked like, what each loss learned to generate from it, how much of that is junk, and
# the images the robust loss trusted least: `summary.png`, the README's figure.

# %%
columns = 1 + len(names)
fig = plt.figure(figsize=(2.6 * columns, 6.4))
grid = fig.add_gridspec(2, columns, height_ratios=(1.0, 1.05))
panels = [("training set", f"{is_contaminated.float().mean().item():.0%} {args.kind} images",
           train_set.images[pick_all][:36])]
panels += [(name, None, trained[name]["samples"][:36]) for name in names]
for column, (title, subtitle, images) in enumerate(panels):
    ax = fig.add_subplot(grid[0, column])
    ax.imshow(image_grid(images, columns=6), cmap="gray", vmin=0, vmax=1)
    if subtitle is None:
        row = next(r for r in results if r["loss"] == title)
        subtitle = f"{row['contaminant_fraction']:.0%} contaminant-like, FD {row['frechet_distance']:.0f}"
    ax.set_title(f"{title}\n{subtitle}", fontsize=9)
    ax.axis("off")
split = (columns + 1) // 2
ax = fig.add_subplot(grid[1, :split])
bars = [r["contaminant_fraction"] for r in results]
ax.barh(names[::-1], bars[::-1], color=["tab:red" if n in ("mse", "kl") else "tab:blue" for n in names[::-1]])
ax.axvline(reference_rows[1]["contaminant_fraction"], color="k", ls="--", lw=1, label="the training set itself")
if "mse" in names:  # the demo's target for a robust loss: at most half the standard MSE's
    ax.axvline(bars[names.index("mse")] / 2, color="tab:red", ls=":", lw=1.5, label="half the standard MSE's")
ax.legend(fontsize=8, loc="lower right")
ax.set_xlabel(f"fraction of generated samples that look like `{args.kind}` contaminants")
ax.set_xlim(0, max(bars + [reference_rows[1]["contaminant_fraction"]]) * 1.2 + 1e-3)
ax.set_title(f"{args.dataset}, {args.contamination:.0%} contaminated, {settings['steps']} steps, seed {args.seed}",
             fontsize=9)
ax = fig.add_subplot(grid[1, split:])
if audit is not None:
    ax.imshow(image_grid(train_set.images[least_trusted], columns=8), cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"audit: {audit_name}'s {audit['shown']} least-trusted training images\n"
                 f"precision at k={audit['flagged']}: {audit['precision_at_k']:.2f}", fontsize=9)
ax.axis("off")
fig.tight_layout()
fig.savefig(OUT / "summary.png", dpi=110)
plt.show() if IN_JUPYTER else plt.close(fig)

# %% [markdown]
# ## Export
#
# The EMA model of one run is exported as TorchScript (for the LibTorch sampler `examples/cpp/sample.cpp`) and
# with `torch.export`, next to a schedule file with `alphas_cumprod`:
#
#     rd_sample --model <out>/export/<loss>.torchscript.pt --schedule <out>/export/<loss>.schedule.txt --out samples

# %%
export_name = args.export_loss or next((name for name in names if name.split("+")[0] == "ned"), names[-1])
if export_name not in trained:
    raise ValueError(f"--export-loss {export_name!r} was not trained; trained: {', '.join(names)}")
if not args.no_export:
    times = torch.tensor([10, 500]) if schedule.discrete else schedule.model_timestep(torch.tensor([0.1, 0.9]))
    example = (torch.randn(2, *image_shape, device=args.device), times.to(args.device))
    paths = export_model(trained[export_name]["trainer"].ema, OUT / "export" / export_name, example,
                         schedule=schedule)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
total = time.perf_counter() - START
(OUT / "wall_time.txt").write_text(f"{total:.1f}\n")
print(f"total wall time {total / 60:.1f} min; results in {OUT}/results.md")
