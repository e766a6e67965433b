"""The spec's mathematics and nothing else: networks, priors, pixel distributions and likelihoods, the
model/guide pairs ``VAE`` (``vae``) and ``SRVAE`` (``srvae``), and the ELBO estimators (``elbo``).

Imports only ``utils``."""
