# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The allowed values of the run options, shared by `cutana.pipeline` and the
``cutana`` command.

It imports only the light kernel modules, so that the command can build its
parser (and start worker processes) before it loads the pipeline.
"""

from .normalization import NORMALIZATIONS
from .resample import RESAMPLE_METHODS

__all__ = ["DTYPES", "FORMATS", "NORMALIZATIONS", "RESAMPLE"]

#: Output formats.
FORMATS = ("zarr", "fits")
#: Output data types.
DTYPES = ("float32", "uint8", "uint16")
#: Resampling methods; ``'none'`` keeps the extracted size.
RESAMPLE = ("none", *RESAMPLE_METHODS)
