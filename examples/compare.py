#!/usr/bin/env python
"""The paper's comparison: VAE vs srVAE (simple, full guide) x (Gaussian, MoG prior).

    python examples/compare.py --quick                       # the whole grid in minutes
    python examples/compare.py --dataset fashion-mnist --data-dir ../shared/data/fashion-mnist --jobs 2

Writes OUT/results.json, OUT/results.md and OUT/samples.png (see docs/results.md);
``--help`` lists the flags. From Python: ``pyro_srvae.experiments.comparison.run_comparison``.
"""

import sys

from pyro_srvae.cli import compare_main

if __name__ == "__main__":
    sys.exit(compare_main(prog="compare.py"))
