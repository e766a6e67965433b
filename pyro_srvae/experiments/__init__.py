"""Experiments over many runs: the VAE vs srVAE comparison of the paper (``comparison``)."""
