# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The allowed values of the run options, shared by `cutana.pipeline` and the
``cutana`` command.

It imports nothing, so that the command can build its parser and start its
worker processes before it loads numpy, astropy or the pipeline.
"""

__all__ = ["DTYPES", "FORMATS", "NORMALIZATIONS", "RESAMPLE", "RESAMPLE_METHODS"]

#: Normalisations (`cutana.normalization.normalize`).
NORMALIZATIONS = ("none", "linear", "sqrt", "log", "asinh", "zscale")
#: Resampling methods of the kernels (`cutana.resample.resample`).
RESAMPLE_METHODS = ("nearest", "bilinear", "area")

#: Output formats.
FORMATS = ("zarr", "fits")
#: Output data types.
DTYPES = ("float32", "uint8", "uint16")
#: Resampling methods of a run; ``'none'`` keeps the extracted size.
RESAMPLE = ("none", *RESAMPLE_METHODS)
