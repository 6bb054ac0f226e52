"""``python -m robust_diffusion``: the package's commands, one line each."""

import sys

COMMANDS = (
    ("python -m robust_diffusion.train", "robust-diffusion-train",
     "train a diffusion model (DDPM or flow matching) with a robust loss, on your images or a benchmark"),
    ("python -m robust_diffusion.audit", "robust-diffusion-audit",
     "rank your training images from least to most trusted by a robust loss (the data audit)"),
)


def main() -> int:
    print("robust_diffusion: robust losses for diffusion-model training on data you cannot fully trust.\n\n"
          "Commands (each takes --help):")
    for module, script, what in COMMANDS:
        print(f"  {module:34s} (or {script}): {what}")
    print("\nThe library itself is imported: import robust_diffusion as rd; rd.RobustDiffusionLoss(...).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
