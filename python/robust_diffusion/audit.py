"""``python -m robust_diffusion.audit DATA --out DIR``: rank your training images from least to most trusted by a
robust diffusion loss (the DDPM kit's :mod:`robust_diffusion.training.audit_command`)."""

import sys

from .training.audit_command import main

if __name__ == "__main__":
    sys.exit(main())
