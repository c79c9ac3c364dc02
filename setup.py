#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Build shim: all metadata lives in pyproject.toml."""

from extension_helpers import get_extensions
from setuptools import setup

setup(ext_modules=get_extensions())
