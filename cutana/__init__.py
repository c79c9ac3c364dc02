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

from .status import Status

#: Names of `cutana.cutout` offered here (see `__getattr__`).
_CUTOUT_NAMES = (
    "BatchCutout2D",
    "Cutout2D",
    "NoOverlapError",
    "PartialOverlapError",
    "cutout_wcs",
    "extract_stack",
)

__all__ = [
    "__version__",
    "Status",
    "iter_cutouts",
    "make_cutouts",
    "open",
    "plan_cutouts",
    *_CUTOUT_NAMES,
]

# Names are loaded when first used, so that `import cutana` stays light: the
# cutout classes pull in astropy.nddata and astropy.coordinates, the pipeline
# zarr, the tile index and the writers. The ``cutana`` command and worker
# processes then import only what their job needs.
_LAZY = {
    "make_cutouts": ("pipeline", "make_cutouts"),
    "iter_cutouts": ("pipeline", "iter_cutouts"),
    "plan_cutouts": ("pipeline", "plan_cutouts"),
    "open": ("io.archive", "open_output"),
    **{name: ("cutout", name) for name in _CUTOUT_NAMES},
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
