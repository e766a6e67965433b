"""Numbers about a model: importance-weighted likelihoods and bits/dim (``likelihood``), super-resolution
scores (``sr_scores``), what the latents carry (``latents``), the Frechet distance (``frechet``) and the
test-set evaluation that gathers them (``evaluate``). Imports ``model``, ``data`` and ``utils``."""
