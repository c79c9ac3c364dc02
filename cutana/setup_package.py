# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Extension modules of cutana, collected by ``extension_helpers``."""

import os

import numpy as np
from setuptools import Extension

__all__ = ["get_extensions"]

ROOT = os.path.relpath(os.path.dirname(__file__))


def get_extensions():
    """Return the compiled extensions of cutana.

    Returns
    -------
    extensions : list of `~setuptools.Extension`
        The ``cutana._extract`` and ``cutana._normalize`` kernels.
    """
    macros = [
        ("NPY_NO_DEPRECATED_API", "NPY_1_21_API_VERSION"),
        ("NPY_TARGET_VERSION", "NPY_1_21_API_VERSION"),
    ]
    if os.environ.get("CUTANA_COVERAGE") == "1":
        macros.append(("CYTHON_TRACE_NOGIL", "1"))
    extensions = []
    for name in ("_extract", "_normalize"):
        source = os.path.join(ROOT, f"{name}.pyx")
        if not os.path.exists(source):
            continue
        extensions.append(
            Extension(
                f"cutana.{name}",
                [source],
                include_dirs=[np.get_include()],
                define_macros=macros,
                extra_compile_args=["-O3"] if os.name != "nt" else [],
            )
        )
    return extensions
