#!/usr/bin/env python
"""Train, evaluate and draw an srVAE (or VAE) on the embedded Fashion-MNIST subset.

    python examples/train_srvae.py --guide full

The same run from Python: ``pyro_srvae.train(pyro_srvae.TrainConfig(guide="full"))``.
``--help`` lists the flags.
"""

import sys

from pyro_srvae.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="train_srvae.py"))
