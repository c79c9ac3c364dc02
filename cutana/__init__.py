# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
cutana: exact, fast, memory-bounded astronomical image cutouts at survey scale.

The package offers a drop-in `Cutout2D`, a batch `BatchCutout2D` over a
compiled extractor, and a pipeline (`make_cutouts` and the ``cutana``
command) that turns a catalogue and a set of survey tiles into Zarr or FITS
cutouts, which `open` reads back.
"""

try:
    from .version import version as __version__
except ImportError:  # pragma: no cover - source tree without a build
    __version__ = "0.0.0"

from .cutout import *  # noqa: F401,F403
from .cutout import __all__ as _cutout_all
from .status import Status

__all__ = [  # noqa: F405 - pipeline names are loaded lazily by __getattr__
    "__version__",
    "Status",
    "iter_cutouts",
    "make_cutouts",
    "open",
    "plan_cutouts",
    *_cutout_all,
]

# The pipeline pulls in zarr, the tile index and the writers; load it only
# when one of its names is first used, so that `import cutana` stays light.
_LAZY = {
    "make_cutouts": ("pipeline", "make_cutouts"),
    "iter_cutouts": ("pipeline", "iter_cutouts"),
    "plan_cutouts": ("pipeline", "plan_cutouts"),
    "open": ("io.archive", "open_output"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        globals()[name] = value
        return value
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
