"""The installed ArviZ, and the one place where its two data structures are told apart.

Classic ArviZ (``arviz<1``) keeps groups in an :class:`arviz.InferenceData`; ArviZ 1.x
(``arviz-base``) in an :class:`xarray.DataTree`. Both hold one :class:`xarray.Dataset` per
group; only the container, and the name of the draws' dimensions, differ. ArviZ is an
optional extra: it is imported only when a function here runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["arviz_backend"]

_INSTALL = "pip install pyro-wakesleep[arviz]"

#: the draws of one run of a Markov chain sampler (and every draw under classic ArviZ)
CHAIN_DRAW = ("chain", "draw")
#: independent draws (of a guide) under ArviZ 1.x, as ``arviz_base.from_numpyro_svi``
SAMPLE = ("sample",)


def arviz_backend() -> str:
    """Which ArviZ is installed: ``"classic"`` (``arviz<1``, :class:`arviz.InferenceData`)
    or ``"datatree"`` (ArviZ 1.x / ``arviz-base``, :class:`xarray.DataTree`).

    :raises ImportError: if neither is installed, saying what to install.
    """
    try:
        import arviz

        if int(arviz.__version__.split(".")[0]) < 1:
            return "classic"
    except ImportError:
        pass
    try:
        import arviz_base  # noqa: F401
    except ImportError as err:
        raise ImportError(f"this needs ArviZ, an optional extra: {_INSTALL}") from err
    return "datatree"


def sample_dims(given: Sequence[str] | None, independent: bool) -> tuple[str, ...]:
    """The leading dimensions of draws: ``given`` (``("chain", "draw")`` or
    ``("sample",)``), else the installed ArviZ's convention: ``("sample",)`` for
    independent draws under ArviZ 1.x (what ``arviz_base.from_numpyro_svi`` does for the
    draws of a guide), ``("chain", "draw")`` for MCMC and under classic ArviZ.

    :raises ValueError: for any other ``given``.
    """
    if given is not None:
        dims = tuple(given)
        if dims not in (CHAIN_DRAW, SAMPLE):
            raise ValueError(
                f"sample_dims must be ('chain', 'draw') or ('sample',), got {given!r}"
            )
        return dims
    return SAMPLE if independent and arviz_backend() == "datatree" else CHAIN_DRAW


def container(datasets: Mapping[str, Any]) -> Any:
    """The groups (name to :class:`xarray.Dataset`) in the installed ArviZ's container:
    :class:`arviz.InferenceData` or :class:`xarray.DataTree`."""
    if arviz_backend() == "classic":
        import arviz as az

        return az.InferenceData(**datasets)
    import xarray as xr

    return xr.DataTree.from_dict({f"/{name}": data for name, data in datasets.items()})


def as_chain_draw(data: Any) -> Any:
    """``data`` (either container) with a ``sample`` dimension turned into
    ``(chain, draw)`` of one chain, for ArviZ's LOO functions, which read ``(chain,
    draw)`` only (``arviz.loo``; ``arviz_stats.loo``, ``loo_approximate_posterior``);
    unchanged if it has none."""

    def convert(dataset: Any) -> Any:
        if SAMPLE[0] not in dataset.dims:
            return dataset
        return dataset.rename({SAMPLE[0]: "draw"}).expand_dims("chain")

    if hasattr(data, "map_over_datasets"):  # xarray.DataTree
        return data.map_over_datasets(convert)
    return data.map(convert)  # arviz.InferenceData
