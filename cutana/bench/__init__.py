# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The benchmark harness of cutana and the synthetic survey it runs on.

`make_survey` writes a Euclid-like synthetic survey (tiles in several bands
and a catalogue with known truth); `make_demo_survey` writes the small one
used by ``cutana demo``.
"""

from .synthetic import *  # noqa: F401,F403
from .synthetic import __all__ as _synthetic_all

__all__ = [*_synthetic_all]
