"""What training on the eq. (23) bound does to a mixture prior's weights, measured.

A 4-component mixture prior p(u) = sum_i w_i N(mu_i, diag sigma_i^2) (the package's
:class:`~pyro_srvae.MixtureOfGaussiansPrior`) is fitted to a fixed aggregate posterior: 200
diagonal Gaussians q_n(u) in two clusters around (-2, 0) and (+2, 0). Two objectives, the same
optimiser and start:

* ``bound``: mean_n sum_i w_i KL(q_n || p_i), the upper bound of eq. (23) (what
  ``--elbo meanfield-mog-bound`` minimises);
* ``sampled``: mean_n E_q[log q_n(u) - log p(u)], the KL itself, by reparameterized sampling
  (what ``--elbo meanfield`` does for a mixture prior).

The bound is linear in w, so its minimiser puts all the weight on the component with the
smallest sum_n KL(q_n || p_i): one Gaussian stretched over both clusters. The script prints the
fitted weights, their effective number of components exp(H(w)) and the exact mean KL of each
fit (Monte Carlo, 4096 draws per q_n). The fit is :mod:`pyro_srvae.model.mixture_fit`; this script runs it::

    python scripts/mixture_bound_collapse.py
"""

import argparse
import json

# The fit lives in the package (pyro_srvae.model.mixture_fit) so that the tutorial and the tests import it
# from any working directory; these names stay here for callers of the script's functions.
from pyro_srvae.model.mixture_fit import effective_components, mean_kl, posterior_clusters  # noqa: F401
from pyro_srvae.model.mixture_fit import fit_mixture_prior as fit


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--components", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    q = posterior_clusters(seed=args.seed)
    results = [fit(objective, q, args.components, args.steps, seed=args.seed) for objective in ("bound", "sampled")]
    for r in results:
        print(f"{r['objective']:>8}: weights {r['weights']}, effective components {r['effective_components']:.2f}, "
              f"mean KL {r['mean_kl']:.3f} (eq. 23 bound {r['bound']:.3f})")  # fmt: skip
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
