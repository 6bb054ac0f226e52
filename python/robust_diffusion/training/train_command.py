"""``python -m robust_diffusion.train`` (``robust-diffusion-train``): train a diffusion model with a robust loss, on
your images or on (contaminated) benchmark data.

    python -m robust_diffusion.train --dataset folder --data-root my_images/ --loss ned --out runs/mine
    python -m robust_diffusion.train --dataset fashion-mnist --contamination 0.3 --kind noise \\
        --loss ned --steps 2000 --out runs/ned --export
    python -m robust_diffusion.train --dataset fashion-mnist --conditional --label-dropout 0.1 --out runs/classes
    torchrun --nproc_per_node 2 -m robust_diffusion.train ...        # data parallel (gloo on CPU, nccl on GPU)

``--dataset folder`` reads ``--data-root``, a folder of image files (resized and centre-cropped to
``--image-size``, default 32) or a ``.npy``/``.npz``/IDX array file, with
:func:`~robust_diffusion.training.data.load_images` (the loader of ``python -m robust_diffusion.audit``). Nothing is
contaminated unless ``--contamination`` says so (default 0).

``--conditional`` trains a class-conditional UNet on the data's labels (the benchmarks' classes, a folder's class
sub-folders, an ``.npz``'s ``labels``), each replaced by the null label with probability ``--label-dropout`` so that
classifier-free guidance (``--guidance-scale``, for the TensorBoard sample grids) can use the same network.

It writes the checkpoint and ``log.csv`` (see :mod:`robust_diffusion.training.trainer`), ``influence.safetensors`` (each
training sample's average influence weight and contamination label) and with ``--export`` the EMA model as
TorchScript + ``torch.export`` + schedule file (:mod:`robust_diffusion.training.export`; a conditional model's take
the class labels as a third input, and ``rd_sample --class`` samples them). ``--resume`` continues
from the checkpoint in ``--out``. What the options build (data, model, loss, schedule) is
:mod:`robust_diffusion.training.experiment`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import save_file

from .arguments import (HelpFormatter, add_objective_arguments, command_name, name_equals_number, non_negative_float,
                        non_negative_int, positive_float, positive_int, stop_on_interrupt)
from .data import CONTAMINATION_KINDS, unreadable_summary
from .distributed import init_distributed
from .experiment import (LOSS_NAMES, LOSS_WEIGHTINGS, MODEL_PRESETS, TRAIN_DATASETS, build_influence_loss, build_loss,
                         build_model, build_schedule, load_experiment_data, loss_settings, parse_loss_name,
                         parse_scale)
from .train_config import MIXED_PRECISION
from .trainer import TrainConfig, Trainer

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=command_name("robust_diffusion.train", "robust-diffusion-train"), formatter_class=HelpFormatter,
        description="Train a diffusion model (DDPM or flow matching) with a robust loss, on your images (--dataset "
                    "folder) or on (contaminated) Fashion-MNIST / CIFAR-10.")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=TRAIN_DATASETS, default="fashion-mnist",
                      help="a benchmark, or folder: your images at --data-root")
    data.add_argument("--data-root", default=None, help="dataset directory (default: Debian's for Fashion-MNIST); "
                      "for --dataset folder a folder of PNG/JPEG/... images or a .npy/.npz/IDX file")
    data.add_argument("--download", action="store_true", help="CIFAR-10: download into --data-root")
    data.add_argument("--contamination", type=float, default=0.0,
                      help="replace this fraction p in [0, 1) of the training images by outliers (default 0: none)")
    data.add_argument("--kind", choices=CONTAMINATION_KINDS, default="noise",
                      help="what replaces them: noise images, the images plus Gaussian noise of --noise-std (its std "
                           "known, for +risk_free), or images of another distribution")
    data.add_argument("--noise-std", type=positive_float, default=0.5, help="std of --kind gaussian")
    data.add_argument("--num-train", type=positive_int, default=None, help="use the first N training images")
    data.add_argument("--image-size", type=positive_int, default=None,
                      help="Fashion-MNIST: 28 or 32; folder: resize and centre-crop to this (default 32 for image "
                           "files, an array's own size)")
    data.add_argument("--channels", type=int, choices=(1, 3), default=None,
                      help="folder: 1 (grey) or 3 (RGB); default 1 if every image is greyscale, else 3")
    loss = parser.add_argument_group("loss")
    loss.add_argument("--loss", default="hellinger", help=f"one of {', '.join(LOSS_NAMES)}, optionally "
                      f"+weighting ({', '.join(LOSS_WEIGHTINGS)}), +risk_free (needs --kind gaussian) and/or "
                      f"+trust (weight each image by its low-noise influence, TrainConfig.sample_trust; on mse, "
                      f"kl or pseudo_huber NED's, measured alongside) and +coherent (trust gated by coherence, so "
                      f"a rare but coherent group keeps its weight), e.g. ned+debias, kl+trust+coherent")
    loss.add_argument("--weighting-param", type=name_equals_number, action="append", default=[], metavar="NAME=VALUE",
                      help="a parameter of the loss name's weighting, repeatable: gamma=5 for min_snr (diffusers' "
                           "--snr_gamma), k=1 gamma=1 for p2, k for max_snr, b for sigmoid, sigma_data for edm")
    loss.add_argument("--scale", default="adaptive", help="adaptive, vlb, batch or a number")
    loss.add_argument("--temperature", type=positive_float, default=1.0, help="the adaptive scale's tau")
    loss.add_argument("--trust-low-noise", type=float, default=0.5,
                      help="+trust: measure the trust on the draws with t below this fraction of the timesteps, in "
                           "(0, 1] (docs/RESULTS.md: where each setting was validated)")
    train = parser.add_argument_group("training")
    add_objective_arguments(train)
    train.add_argument("--conditional", action="store_true",
                       help="class-conditional: the UNet gets each image's class label (the benchmarks' classes, a "
                            "folder's class sub-folders or an .npz's 'labels')")
    train.add_argument("--label-dropout", type=float, default=0.1,
                       help="--conditional: the probability of training on the null label instead, for "
                            "classifier-free guidance, in [0, 1)")
    train.add_argument("--model", default="tiny", choices=sorted(MODEL_PRESETS), help="the UNet preset")
    train.add_argument("--base-channels", type=positive_int, default=None, help="override the preset's base channels")
    train.add_argument("--steps", type=positive_int, default=2000, help="optimizer steps of the whole run")
    train.add_argument("--batch-size", type=positive_int, default=64,
                       help="global batch of one optimizer step (split over ranks)")
    train.add_argument("--gradient-accumulation-steps", type=positive_int, default=1,
                       help="process each rank's share of the batch in this many micro-batches (less memory, the "
                            "same step)")
    train.add_argument("--lr", type=positive_float, default=2e-4, help="AdamW's learning rate")
    train.add_argument("--warmup-steps", type=non_negative_int, default=0, help="linear learning-rate warm-up")
    train.add_argument("--ema-decay", type=float, default=0.999, help="decay of the weights' EMA, in [0, 1)")
    train.add_argument("--grad-clip", type=non_negative_float, default=1.0,
                       help="clip the gradient norm to this; 0 turns clipping off")
    train.add_argument("--mixed-precision", default="auto", choices=MIXED_PRECISION,
                       help="autocast: auto is bf16 (fp16 with a grad scaler where bf16 is missing) on a GPU and "
                            "none on the CPU; bf16 works on the CPU too")
    train.add_argument("--log-every", type=positive_int, default=50, help="steps per row of log.csv")
    train.add_argument("--checkpoint-every", type=non_negative_int, default=500,
                       help="steps between checkpoints (0: only at the end)")
    train.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    train.add_argument("--seed", type=int, default=0, help="seeds the data, the contamination, the noise and the model")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    train.add_argument("--threads", type=positive_int, default=None,
                       help="torch CPU threads per process (default: torch's, one per core)")
    out = parser.add_argument_group("output")
    out.add_argument("--out", required=True, help="output directory")
    out.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.safetensors if it exists")
    out.add_argument("--export", action="store_true",
                     help="export the EMA model (TorchScript, torch.export, schedule file) for rd_sample; with "
                          "--conditional the programs take the class labels as a third input")
    out.add_argument("--report-to", choices=("tensorboard",), default=None,
                     help="also log to TensorBoard, in <out>/tensorboard (pip install tensorboard), as diffusers' "
                          "--report_to")
    out.add_argument("--sample-every", type=non_negative_int, default=0,
                     help="with --report-to: steps between grids of the EMA model's samples (0: none)")
    out.add_argument("--guidance-scale", type=non_negative_float, default=1.0,
                     help="--conditional: the classifier-free guidance scale of the sample grids (1: none)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        spec = parse_loss_name(args.loss)
        if spec.risk_free and args.kind != "gaussian":
            raise ValueError(f"--loss {args.loss}: +risk_free needs --kind gaussian (samples with a known noise std); "
                             f"with --kind {args.kind} every sample's risk is 0 and it would train plain {spec.loss}")
        scale = parse_scale(args.scale)
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size,
                             gradient_accumulation_steps=args.gradient_accumulation_steps, lr=args.lr,
                             warmup_steps=args.warmup_steps, ema_decay=args.ema_decay,
                             grad_clip=args.grad_clip if args.grad_clip > 0 else None,
                             mixed_precision=args.mixed_precision, log_every=args.log_every,
                             report_to=args.report_to, sample_every=args.sample_every,
                             checkpoint_every=args.checkpoint_every, risk_free=spec.risk_free,
                             sample_trust=spec.trust, trust_coherence=spec.coherent,
                             trust_low_noise=args.trust_low_noise, conditional=args.conditional,
                             label_dropout=args.label_dropout, guidance_scale=args.guidance_scale, seed=args.seed,
                             num_workers=args.num_workers, progress=not args.no_progress)
        rank, world_size, device = init_distributed(args.device)
        out = Path(args.out)
        schedule = build_schedule(args.objective, args.shift, args.timestep_sampling)
        if spec.risk_free and not schedule.discrete:
            raise ValueError(f"--loss {args.loss}: +risk_free trains DDPM steps (--objective ddpm)")
        loss_fn = build_loss(spec, schedule, scale=scale, temperature=args.temperature,
                             weighting_params=dict(args.weighting_param))
        data = load_experiment_data(args.dataset, args.contamination, args.kind, root=args.data_root,  # the slow part
                                    num_train=args.num_train, image_size=args.image_size,
                                    noise_std=args.noise_std, seed=args.seed, download=args.download,
                                    channels=args.channels)
        overrides = {"base_channels": args.base_channels} if args.base_channels else {}
        if args.conditional:
            if data.num_classes is None:
                raise ValueError(f"--conditional needs class labels, and {args.data_root} has none: use a folder of "
                                 f"class sub-folders, an .npz with a 'labels' array, or a benchmark dataset")
            overrides["num_classes"] = data.num_classes
        torch.manual_seed(args.seed)  # the same initial weights on every rank and in every run of this seed
        model = build_model(args.model, data.image_shape[0], **overrides)
        trainer = Trainer(model, loss_fn, data.train, schedule, config, out_dir=out, device=device,
                          influence_loss=build_influence_loss(spec, schedule, temperature=args.temperature))
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            classes = f", conditional on {data.num_classes} classes" if args.conditional else ""
            print(f"{data.description}; loss {spec.name} ({loss_settings(loss_fn)}); model {args.model}{classes} "
                  f"({sum(p.numel() for p in model.parameters()):,} parameters); {world_size} process(es) on "
                  f"{device}", flush=True)
            for note in data.notes:
                print(f"  {note}", flush=True)
            if data.unreadable:
                print(f"  {unreadable_summary(data.unreadable)}; all of them in {out / 'unreadable.txt'}", flush=True)
                (out / "unreadable.txt").write_text("".join(f"{path}\t{reason}\n" for path, reason in data.unreadable))
        resumed = args.resume and trainer.resume()
    except (ValueError, FileNotFoundError, ImportError) as error:
        parser.error(str(error))
    if rank == 0:  # after the resume's checks: a refused run leaves the run's args.json as it was
        (out / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    if resumed:
        if rank == 0:
            print(f"resumed from {trainer.checkpoint_path} at step {trainer.step}", flush=True)
    elif rank == 0 and trainer.log_path.is_file():
        trainer.log_path.unlink()  # a fresh run starts a fresh log
    with stop_on_interrupt(trainer) as interrupted:
        trainer.train()
    if interrupted:
        print(f"interrupted at step {trainer.step} of {args.steps}: --resume continues from "
              f"{trainer.checkpoint_path}", flush=True)
        return 130

    if rank == 0:
        mean, count = trainer.average_influence()
        save_file({"mean_influence": mean, "count": count, "is_contaminated": data.train.is_contaminated.cpu()},
                  out / "influence.safetensors")
        seen = count > 0
        flags = data.train.is_contaminated.cpu()
        if flags[seen].any() and (~flags[seen]).any():
            from .metrics import auroc
            print(f"AUROC of low average influence as a contamination detector: "
                  f"{auroc(-mean[seen], flags[seen]):.4f}", flush=True)
        if args.export:
            from .export import export_model
            times = torch.tensor([10, 500]) if schedule.discrete else schedule.model_timestep(torch.tensor([0.1, 0.9]))
            example = (torch.randn(2, *data.image_shape, device=device), times.to(device))
            if args.conditional:  # a class and the null label, so the check covers both embeddings' paths
                example += (torch.tensor([0, data.num_classes], device=device),)
            paths = export_model(trainer.ema, out / "model", example, schedule=schedule)
            print("exported: " + ", ".join(str(p) for p in paths.values()), flush=True)
    if world_size > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
