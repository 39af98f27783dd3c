"""Worked examples built on the library, behind the ``examples`` extra
(``pip install pyro-wakesleep[examples]``: scikit-learn and matplotlib).

Each lives in its own module, imported from there (this package re-exports nothing, so
importing one example never imports the others):

* :mod:`pyro_wakesleep.examples.models` — sigmoid belief nets (Helmholtz machines);
* :mod:`pyro_wakesleep.examples.mixture` — the Gaussian mixture of Le et al. (2019);
* :mod:`pyro_wakesleep.examples.datasets` — binarized digits (scikit-learn) and MNIST;
* :mod:`pyro_wakesleep.examples.compare` — the side-by-side comparison of objectives;
* :mod:`pyro_wakesleep.examples.parallel` — the same comparison data-parallel;
* :mod:`pyro_wakesleep.examples.cli` — the ``pyro-wakesleep`` command line.

Only :func:`~pyro_wakesleep.examples.datasets.load_digits` (scikit-learn) and
:func:`~pyro_wakesleep.examples.compare.save` (matplotlib) need the extra; they import it
when called.
"""

__all__: list[str] = []
