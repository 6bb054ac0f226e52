"""``python -m robust_diffusion.train``: the DDPM kit's training command (:mod:`robust_diffusion.ddpm.cli`)."""

import sys

from .ddpm.cli import main

if __name__ == "__main__":
    sys.exit(main())
