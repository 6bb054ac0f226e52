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
# # Class-conditional diffusion on mislabeled data
#
# **The story.** A class-conditional model learns what each label looks like from the (image, label) pairs it is
# given. Flip 30% of Fashion-MNIST's confusable labels (T-shirt/top <-> Shirt, Pullover <-> Coat, Sandal <-> Sneaker,
# as the label-noise literature flips them) and every image is still a clean garment: nothing about the images
# is wrong, so the unconditional audit cannot see it, but the model asked for a Shirt now draws T-shirts too. This
# notebook trains the same conditional DDPM on the noisy labels and on the true ones (the ceiling), judges the
# samples generated for each class with an independent classifier (the accuracy of conditional samples, as TDSM,
# arXiv 2402.17517, reports it), and then asks the noisy model which pairs are mismatched: each image's denoising
# error under every label, with the same noise for all labels (`robust_diffusion.training.pairs`), gives the label
# the model prefers and scores each pair, beside the confident-learning baseline (a classifier trained out of fold
# on the same noisy labels) and the unconditional influence statistics.
#
# Which of these signals finds mismatched pairs best is decided by the rule of docs/RESULTS.md ("Mismatched-pair
# rule"), whose runs call this notebook with `--preset pairs --runs noisy`; how the winner trains a model that is
# robust to the wrong labels gets its own rule after that.
#
# Run it as a script (`python examples/label_noise.py`) or as a notebook (`jupytext --to notebook
# examples/label_noise.py`; options in the environment variable `RD_EXAMPLE_ARGS`). The `demo` preset takes
# about a quarter of an hour on a 2-core CPU.

# %%
import argparse
import csv
import math
import os
import shlex
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Passive OpenMP waiting: two runs share the cores (see examples/cifar10_contaminated.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import robust_diffusion as rd  # noqa: E402
from robust_diffusion.training import conditional_metrics, diversity, metrics  # noqa: E402
from robust_diffusion.training.audit_pairs import pairs_grid  # noqa: E402
from robust_diffusion.training.data import FASHION_MNIST_CLASSES  # noqa: E402
from robust_diffusion.training.experiment import (build_loss, build_model, build_schedule,  # noqa: E402
                                                  load_experiment_data)
from robust_diffusion.training.label_noise import LABEL_NOISE_KINDS  # noqa: E402
from robust_diffusion.training.pairs import (confident_learning_scores, detection_quality, label_errors,  # noqa: E402
                                             pair_scores)
from robust_diffusion.training.sampling import ddim_sample  # noqa: E402
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
# `demo` trains two models (noisy labels, true labels) two at a time on a 2-core CPU; `pairs` is the mismatched-pair
# rule's protocol (one model on the noisy labels, every pair scored); `smoke` runs every cell in seconds for the
# tests (its numbers mean nothing). The model, data and budget are the main job's (examples/cifar10_contaminated.py,
# `demo`): the 0.27M-parameter UNet, here with 10 class embeddings and a null label, 2,400 training images,
# 1000 steps of batch 32, label dropout 0.1 so that the one network is also the unconditional model.

# %%
BASE = dict(model="quick", model_overrides=dict(attention_levels=()), image_size=28, num_train=2400, steps=1000,
            batch_size=32, lr=2e-3, warmup_steps=20, ema_decay=0.995, label_dropout=0.1, per_class=40,
            ddim_steps=10, reference=2000, classifier_train=10000, classifier_epochs=1, judge_train=50000,
            judge_epochs=2, cl_folds=4, cl_epochs=2, temperature=0.25)
PRESETS = {
    "demo": dict(BASE, runs=("noisy", "clean")),
    "pairs": dict(BASE, runs=("noisy",)),
    "smoke": dict(BASE, model="micro", model_overrides={}, num_train=128, steps=3, batch_size=16, warmup_steps=0,
                  ema_decay=0.9, per_class=2, ddim_steps=2, reference=256, classifier_train=512, judge_train=512,
                  judge_epochs=1, cl_epochs=1, runs=("noisy", "clean")),
}
#: What each run trains on.
RUNS = {"noisy": "the noisy labels", "clean": "the true labels (the ceiling)"}


def build_parser():
    parser = argparse.ArgumentParser(description="Train a class-conditional DDPM on mislabeled Fashion-MNIST: "
                                                 "conditional accuracy, and which signal finds the wrong pairs.")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="demo")
    parser.add_argument("--label-noise", type=float, default=0.3, help="the share of labels flipped, in [0, 1)")
    parser.add_argument("--label-noise-kind", choices=LABEL_NOISE_KINDS, default="asymmetric",
                        help="asymmetric: the confusable classes; symmetric: any other class")
    parser.add_argument("--rare-class", type=int, default=None,
                        help="a control: keep this class at --rare-fraction of the training images (its accuracy is "
                             "then reported on its own)")
    parser.add_argument("--rare-fraction", type=float, default=0.03, help="the rare class's share of the images")
    parser.add_argument("--runs", nargs="+", choices=tuple(RUNS), default=None,
                        help="noisy: the MSE on the noisy labels; clean: on the true labels (default: preset)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: preset)")
    parser.add_argument("--per-class", type=int, default=None, help="samples generated per class (default: preset)")
    parser.add_argument("--guidance-scale", type=float, default=1.0,
                        help="classifier-free guidance of the samples (1: none, the conditional model itself)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--out", default="outputs/label_noise")
    parser.add_argument("--eval-cache", default=None,
                        help="where the evaluation networks are cached (default: <out>/cache); the main example's "
                             "cache holds the same networks")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: the cores, shared out between the runs while they train)")
    return parser


PARSER = build_parser()


def parse_args(argv=None):
    if argv is None:
        # A Jupyter kernel's own argv (-f kernel.json) is not ours; options come from RD_EXAMPLE_ARGS there.
        argv = ([] if IN_JUPYTER else sys.argv[1:]) + shlex.split(os.environ.get("RD_EXAMPLE_ARGS", ""))
    args = PARSER.parse_args(argv)
    settings = dict(PRESETS[args.preset])
    for key in ("steps", "per_class", "runs"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    settings["runs"] = tuple(dict.fromkeys(settings["runs"]))
    if not 0.0 <= args.label_noise < 1.0:
        PARSER.error(f"--label-noise must be a fraction in [0, 1), got {args.label_noise!r}")
    for key in ("steps", "per_class", "threads"):
        value = settings.get(key) if key != "threads" else args.threads
        if value is not None and value < 1:
            PARSER.error(f"--{key.replace('_', '-')} must be at least 1, got {value!r}")
    if args.rare_class is not None and not 0 <= args.rare_class < 10:
        PARSER.error(f"--rare-class must be a Fashion-MNIST class in [0, 10), got {args.rare_class}")
    if not 0 < args.rare_fraction < 1:
        PARSER.error(f"--rare-fraction must be a fraction in (0, 1), got {args.rare_fraction!r}")
    if not args.guidance_scale >= 0:
        PARSER.error(f"--guidance-scale must be non-negative, got {args.guidance_scale!r}")
    if "noisy" in settings["runs"] and args.label_noise == 0:
        print("note: --label-noise 0 leaves every label as it is: the pair scores have nothing to find")
    args.settings = settings
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return args


args = parse_args()
settings = args.settings
OUT = Path(args.out)
OUT.mkdir(parents=True, exist_ok=True)
CORES = args.threads or os.cpu_count() or 1
torch.set_num_threads(CORES)
print(f"preset {args.preset}, {args.label_noise:.0%} {args.label_noise_kind} label noise, runs "
      f"{list(settings['runs'])}, seed {args.seed}, device {args.device}, out {OUT}")

# %% [markdown]
# ## Data
#
# The same 2,400 images twice: with the flipped labels the noisy run trains on, and with their true labels. The
# mask of flipped pairs is kept for evaluation only.

# %%
common = dict(num_train=settings["num_train"], image_size=settings["image_size"], seed=args.seed,
              rare_class=args.rare_class, rare_fraction=args.rare_fraction)
noisy = load_experiment_data("fashion-mnist", 0.0, **common, label_noise=args.label_noise,
                             label_noise_kind=args.label_noise_kind)
true = load_experiment_data("fashion-mnist", 0.0, **common)
flipped = (noisy.label_flipped if noisy.label_flipped is not None
           else torch.zeros(len(noisy.train), dtype=torch.bool))
NUM_CLASSES = noisy.num_classes
CLASSES = FASHION_MNIST_CLASSES[:NUM_CLASSES]
noisy_labels, true_labels = noisy.train.labels.cpu(), true.train.labels.cpu()
print(noisy.description)


def image_grid(images, rows):
    """``images`` [rows * columns, C, H, W] in [-1, 1] as one [H', W'] array, row by row."""
    columns = images.shape[0] // rows
    grid = images[:rows * columns].add(1).div(2).clamp(0, 1)[:, 0]
    grid = grid.reshape(rows, columns, *grid.shape[1:]).permute(0, 2, 1, 3)
    return grid.reshape(rows * grid.shape[1], columns * grid.shape[3]).numpy()


def show_flipped(path, count=16):
    shown = torch.nonzero(flipped).flatten()[:count].tolist()
    if not shown:
        return
    figure, axes = plt.subplots(1, len(shown), figsize=(1.1 * len(shown), 1.5), squeeze=False)
    for ax, i in zip(axes.flat, shown):
        ax.imshow(noisy.train.images[i, 0].add(1).div(2).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{CLASSES[noisy_labels[i]]}\n(is {CLASSES[true_labels[i]]})", fontsize=6, color="tab:red")
        ax.axis("off")
    figure.suptitle("flipped pairs: the label training sees (the true class)", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


show_flipped(OUT / "flipped_pairs.png")

# %% [markdown]
# ## The judges
#
# The class judge (the evaluation CNN trained on 50,000 clean images) decides which class a sample shows; the
# feature classifier's features give the Frechet distances. Both are the main example's networks, trained with its
# seed and cached under the same names, so a shared `--eval-cache` judges both examples' runs alike.

# %%
eval_cache = Path(args.eval_cache) if args.eval_cache else OUT / "cache"
t0 = time.perf_counter()
classifier_data = load_experiment_data("fashion-mnist", 0.0, num_train=settings["classifier_train"],
                                       image_size=settings["image_size"])
classifier = metrics.train_classifier(classifier_data.train.images, classifier_data.train_labels,
                                      test_images=noisy.test_images, test_labels=noisy.test_labels,
                                      epochs=settings["classifier_epochs"], seed=0,
                                      cache_path=eval_cache / "classifier.safetensors", device=args.device,
                                      progress=not IN_JUPYTER)
judge_data = load_experiment_data("fashion-mnist", 0.0, num_train=settings["judge_train"],
                                  image_size=settings["image_size"])
judge = metrics.train_classifier(judge_data.train.images, judge_data.train_labels, test_images=noisy.test_images,
                                 test_labels=noisy.test_labels, epochs=settings["judge_epochs"], seed=0,
                                 cache_path=eval_cache / "class_judge.safetensors", device=args.device,
                                 progress=not IN_JUPYTER)
reference = noisy.test_images[:settings["reference"]]
reference_labels = noisy.test_labels[:settings["reference"]]
reference_features = metrics.extract_features(classifier.model, reference)
print(f"class judge: test accuracy {judge.test_accuracy:.3f}; feature classifier: {classifier.test_accuracy:.3f} "
      f"({time.perf_counter() - t0:.0f} s)")

# %% [markdown]
# ## Training
#
# Each run trains the same network from the same initial weights on the same batches and noise; only the labels
# differ. The standard MSE trains; NED's influence weights are measured alongside (temperature 0.25, as in the
# main job), so each pair also has its mean influence weight and its trust, the unconditional audit's signals.

# %%
schedule = build_schedule("ddpm")


def make_trainer(run):
    run_dir = OUT / "runs" / run
    shutil.rmtree(run_dir, ignore_errors=True)
    torch.manual_seed(args.seed)
    model = build_model(settings["model"], 1, num_classes=NUM_CLASSES, **settings["model_overrides"])
    config = TrainConfig(steps=settings["steps"], batch_size=settings["batch_size"], lr=settings["lr"],
                         warmup_steps=settings["warmup_steps"], ema_decay=settings["ema_decay"],
                         log_every=max(1, settings["steps"] // 30), influence_from_step=settings["steps"] // 5,
                         conditional=True, label_dropout=settings["label_dropout"], seed=args.seed,
                         progress=not IN_JUPYTER, progress_label=run)
    influence = rd.RobustDiffusionLoss("ned", schedule, temperature=settings["temperature"], update="step")
    dataset = (noisy if run == "noisy" else true).train
    return Trainer(model, build_loss("mse", schedule), dataset, schedule, config, out_dir=run_dir,
                   device=args.device, influence_loss=influence)


def timed_training(trainer):
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


trainers = {run: make_trainer(run) for run in settings["runs"]}
jobs = min(len(trainers), CORES)
torch.set_num_threads(max(1, CORES // jobs))
with ThreadPoolExecutor(max_workers=jobs) as pool:
    futures = {run: pool.submit(timed_training, trainer) for run, trainer in trainers.items()}
    try:
        train_seconds = {run: future.result() for run, future in futures.items()}
    except BaseException:  # Ctrl-C or a failed run: the other stops after its current step
        pool.shutdown(wait=False, cancel_futures=True)
        for trainer in trainers.values():
            trainer.stop()
        raise
torch.set_num_threads(CORES)

# %% [markdown]
# ## Samples per class
#
# Each model draws `per_class` samples for every class (DDIM, 10 steps; no guidance unless `--guidance-scale`);
# the judge says which class each shows. Conditional accuracy: the share judged as the class asked for.

# %%
requested = conditional_metrics.requested_labels(NUM_CLASSES, settings["per_class"])
results, samples_of = [], {}
for run, trainer in trainers.items():
    t0 = time.perf_counter()
    generator = torch.Generator(args.device).manual_seed(args.seed)
    samples = ddim_sample(trainer.ema, schedule, (requested.shape[0], 1, settings["image_size"],
                                                  settings["image_size"]),
                          num_steps=settings["ddim_steps"], generator=generator, device=args.device,
                          class_labels=requested.to(args.device), guidance_scale=args.guidance_scale).cpu()
    samples = samples.clamp(-1, 1)
    samples_of[run] = samples
    save_file({"samples": samples.contiguous(), "requested": requested}, OUT / "runs" / run / "samples.safetensors")
    accuracy = conditional_metrics.conditional_accuracy(judge.model, samples, requested, NUM_CLASSES)
    features = metrics.extract_features(classifier.model, samples)
    per_class_fd = conditional_metrics.class_frechet_distances(features, requested, reference_features,
                                                               reference_labels, NUM_CLASSES)
    results.append({"run": run, "labels": RUNS[run], "conditional_accuracy": accuracy.mean,
                    **{f"accuracy_{k}": accuracy.per_class[k].item() for k in range(NUM_CLASSES)},
                    **({"rare_accuracy": accuracy.per_class[args.rare_class].item()}
                       if args.rare_class is not None else {}),
                    "frechet_distance": metrics.frechet_distance(features, reference_features),
                    "class_frechet_distance": per_class_fd.nanmean().item(),
                    **diversity.manifold_metrics(reference_features, features, k=5),
                    "train_s": train_seconds[run], "sample_s": time.perf_counter() - t0})
    print(f"MSE on {RUNS[run]}: conditional accuracy {accuracy.mean:.3f}, FD {results[-1]['frechet_distance']:.2f}, "
          f"per-class FD {results[-1]['class_frechet_distance']:.2f}, coverage {results[-1]['coverage']:.3f}, "
          f"train {train_seconds[run]:.0f} s")

# %% [markdown]
# ## Which pairs are mismatched?
#
# On the noisy run's EMA model: every image's denoising error under each of the 10 labels and the null label at
# noise levels 0.3-0.7 of the schedule (one draw each, the same for all labels), turned into the three scores of
# `pair_scores` (margin, contrast, mistrust); the pair's mean NED influence weight and trust measured during
# training; and the confident-learning baseline. Each score's AUROC and precision at k (k = the number flipped).

# %%
pair_rows = []
if "noisy" in trainers:
    t0 = time.perf_counter()
    trainer = trainers["noisy"]
    errors = label_errors(trainer.ema, schedule, noisy.train.images, seed=args.seed, device=args.device)
    scores = pair_scores(errors, noisy_labels)
    mean_influence, draws = trainer.average_influence()
    mean_influence = torch.where(draws > 0, mean_influence, 1.0)  # a pair never drawn: the neutral weight
    signals = {"margin": scores.margin, "contrast": scores.contrast, "mistrust": scores.mistrust,
               "influence": 1 - mean_influence.cpu(), "trust": 1 - trainer.influence.trust().cpu(),
               "confident learning": confident_learning_scores(noisy.train.images, noisy_labels,
                                                                num_classes=NUM_CLASSES, folds=settings["cl_folds"],
                                                                epochs=settings["cl_epochs"], seed=args.seed)}
    quality = detection_quality(signals, flipped) if bool(flipped.any()) else {}
    # Of the flipped pairs, how many the model's preferred label restores to the true one.
    restored = (scores.preferred[flipped] == true_labels[flipped]).float().mean().item() if flipped.any() else math.nan
    for name, values in quality.items():
        pair_rows.append({"signal": name, **values, "flipped": int(flipped.sum()), "restored": restored})
        print(f"{name}: AUROC {values['auroc']:.3f}, precision at k {values['precision_at_k']:.3f}")
    print(f"the preferred label is the true one for {restored:.1%} of the flipped pairs "
          f"({time.perf_counter() - t0:.0f} s)")
    rows = sorted(({"rank": 0, "index": i, "label": int(noisy_labels[i]), "preferred": int(scores.preferred[i]),
                    "margin": float(scores.margin[i])} for i in range(len(noisy_labels))),
                  key=lambda row: (-row["margin"], row["index"]))
    for rank, row in enumerate(rows):
        row["rank"] = rank + 1
    pairs_grid(OUT / "suspected_pairs.png", noisy.train.images, rows, CLASSES, 24)

# %% [markdown]
# ## Results

# %%
def write_csv(path, rows):
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows)


write_csv(OUT / "results.csv", results)
write_csv(OUT / "pair_signals.csv", pair_rows)
lines = [f"# Class-conditional DDPM on {noisy.description}", "",
         f"Preset {args.preset}, seed {args.seed}, {settings['steps']} steps, {settings['per_class']} samples a class, "
         f"guidance scale {args.guidance_scale}, device {args.device}.", "",
         "| run | conditional accuracy | FD | per-class FD (mean) | coverage | " +
         " | ".join(CLASSES) + " |", "|---" * (5 + NUM_CLASSES) + "|"]
for row in results:
    lines.append(f"| {row['labels']} | {row['conditional_accuracy']:.3f} | {row['frechet_distance']:.2f} | "
                 f"{row['class_frechet_distance']:.2f} | {row['coverage']:.3f} | "
                 + " | ".join(f"{row[f'accuracy_{k}']:.2f}" for k in range(NUM_CLASSES)) + " |")
if pair_rows:
    lines += ["", f"Finding the {pair_rows[0]['flipped']} flipped pairs (the preferred label restores "
              f"{pair_rows[0]['restored']:.1%} of them):", "", "| signal | AUROC | precision at k |", "|---|---|---|"]
    lines += [f"| {row['signal']} | {row['auroc']:.3f} | {row['precision_at_k']:.3f} |" for row in pair_rows]
(OUT / "results.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))

# %% [markdown]
# ## The figure
#
# Top, one row per class: what each model generates when asked for that class, and the accuracy per class.
# Bottom (with the noisy run): the pairs the noisy model finds most suspect, each with the label it was given and
# the label the model prefers (red: a flipped pair, as the evaluation mask says).

# %%
suspects = rows[:12] if pair_rows else []
figure = plt.figure(figsize=(3.2 * len(results) + 4.5, 4.8 + (1.7 if suspects else 0)), layout="constrained")
top, bottom = (figure.subfigures(2, 1, height_ratios=[4.8, 1.7]) if suspects else (figure, None))
axes = top.subplots(1, len(results) + 1, gridspec_kw=dict(width_ratios=[1] * len(results) + [1.4]))
shown = min(8, settings["per_class"])
for ax, row in zip(axes, results):
    picked = torch.cat([samples_of[row["run"]][requested == k][:shown] for k in range(NUM_CLASSES)])
    ax.imshow(image_grid(picked, NUM_CLASSES), cmap="gray", vmin=0, vmax=1)
    ax.set_yticks([(k + 0.5) * settings["image_size"] for k in range(NUM_CLASSES)], CLASSES, fontsize=7)
    ax.set_xticks([])
    ax.set_title(f"MSE on {row['labels']}\naccuracy {row['conditional_accuracy']:.2f}", fontsize=9)
bars = axes[-1]
width = 0.8 / len(results)
for j, row in enumerate(results):
    bars.barh([k + j * width for k in range(NUM_CLASSES)], [row[f"accuracy_{k}"] for k in range(NUM_CLASSES)],
              height=width, label=row["labels"])
bars.set_yticks([k + 0.4 - width / 2 for k in range(NUM_CLASSES)], CLASSES, fontsize=7)
bars.invert_yaxis()
bars.set_xlim(0, 1)
bars.set_xlabel("share of samples judged as the class asked for")
bars.legend(fontsize=7, loc="lower right")
top.suptitle(f"{args.label_noise:.0%} {args.label_noise_kind} label noise", fontsize=10)
if suspects:
    strip = bottom.subplots(1, len(suspects))
    for ax, row in zip(strip, suspects):
        ax.imshow(noisy.train.images[row["index"], 0].add(1).div(2).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{CLASSES[row['label']]}\n-> {CLASSES[row['preferred']]}", fontsize=6,
                     color="tab:red" if flipped[row["index"]] else "black")
        ax.axis("off")
    bottom.suptitle("the most suspect pairs: given label -> the label the model prefers (red: flipped)", fontsize=8)
figure.savefig(OUT / "summary.png", dpi=110)
plt.close(figure)
print(f"wrote {OUT / 'results.md'}, {OUT / 'summary.png'} in {time.perf_counter() - START:.0f} s")
