# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
cutana: exact, fast, memory-bounded astronomical image cutouts at survey scale.

The package offers a drop-in `Cutout2D`, a batch `BatchCutout2D` over a
compiled extractor, and a pipeline (`make_cutouts` and the ``cutana``
command) that turns a catalogue and a set of survey tiles into Zarr or FITS
cutouts.
"""

try:
    from .version import version as __version__
except ImportError:  # pragma: no cover - source tree without a build
    __version__ = "0.0.0"

from .cutout import *  # noqa: F401,F403
from .cutout import __all__ as _cutout_all
from .status import Status

__all__ = ["__version__", "Status", *_cutout_all]
