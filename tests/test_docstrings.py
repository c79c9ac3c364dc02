# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The examples in the docstrings of the installed package run and are right.

pytest's ``--doctest-modules`` cannot reach the installed package from
``testpaths`` (and must not import the source tree, which has no compiled
extensions), so each public module of the imported ``cutana`` is run through
`doctest` here.
"""

import doctest
import importlib
import io
import pkgutil

import pytest

import cutana

# build helpers and generated files: nothing to document, and setup_package
# needs the build-time dependencies
_NOT_DOCUMENTED = {"cutana.version", "cutana.compiler_version", "cutana.setup_package"}


def _public_modules():
    names = ["cutana"]
    for info in pkgutil.walk_packages(cutana.__path__, "cutana."):
        parts = info.name.split(".")[1:]
        if any(part.startswith("_") for part in parts) or info.name in _NOT_DOCUMENTED:
            continue
        names.append(info.name)
    return sorted(names)


PUBLIC_MODULES = _public_modules()


def test_public_modules_found():
    """Test that the module list covers the layers the docs document."""
    for name in ("cutana.cutout", "cutana.normalization", "cutana.pipeline",
                 "cutana.io.archive", "cutana.bench.synthetic"):
        assert name in PUBLIC_MODULES


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    """Test that every docstring example of a public module gives its output."""
    module = importlib.import_module(name)
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(
        optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    )
    report = io.StringIO()
    for test in finder.find(module, name):
        runner.run(test, out=report.write)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} example(s) failed in {name}:\n" + (
        report.getvalue()
    )
