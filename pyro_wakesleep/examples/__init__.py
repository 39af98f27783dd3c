"""Worked examples built on the library, behind the ``examples`` extra
(``pip install pyro-wakesleep[examples]``: scikit-learn and matplotlib).

Each lives in its own module, imported from there (this package re-exports nothing, so
importing one example never imports the others):

* :mod:`pyro_wakesleep.examples.models` — sigmoid belief nets (Helmholtz machines);
* :mod:`pyro_wakesleep.examples.mixture` — the Gaussian mixture of Le et al. (2019);
* :mod:`pyro_wakesleep.examples.datasets` — binarized MNIST (a subset ships in the
  package), binarized digits (scikit-learn);
* :mod:`pyro_wakesleep.examples.contenders` — the objectives the comparison trains, and
  their training steps;
* :mod:`pyro_wakesleep.examples.compare` — the side-by-side comparison of objectives;
* :mod:`pyro_wakesleep.examples.figure` — its figure;
* :mod:`pyro_wakesleep.examples.parallel` — the same comparison data-parallel;
* :mod:`pyro_wakesleep.examples.cli` — the ``pyro-wakesleep`` command line.

Only :func:`~pyro_wakesleep.examples.datasets.load_digits` (scikit-learn),
:func:`~pyro_wakesleep.examples.compare.save` and
:func:`~pyro_wakesleep.examples.figure.plot` (matplotlib) need the extra; they import it
when called.
"""

__all__: list[str] = []
