"""``python -m robust_diffusion.train``: the DDPM kit's training command (:mod:`robust_diffusion.training.train_command`)."""

import sys

from .training.train_command import main

if __name__ == "__main__":
    sys.exit(main())
