# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Sphinx configuration of the cutana documentation.

Build with::

    pip install ".[docs]"
    sphinx-build -W -b html docs docs/_build/html

Without network access (no intersphinx inventories, so cross-references to
numpy / astropy are not checked), set ``CUTANA_DOCS_OFFLINE=1``.
The examples in the ``.rst`` files are doctests, run with
``pytest --doctest-rst docs`` (pytest-doctestplus).
"""

import contextlib
import importlib
import io
import os
from importlib import metadata, util

try:
    from sphinx_astropy.conf.v3 import *  # noqa: F403

    HAS_SPHINX_ASTROPY = True
except ImportError:  # plain numpydoc / autodoc configuration
    HAS_SPHINX_ASTROPY = False
    extensions = [
        "sphinx.ext.autodoc",
        "sphinx.ext.intersphinx",
        "sphinx.ext.mathjax",
        "sphinx.ext.todo",
        "sphinx.ext.viewcode",
        "numpydoc",
    ]
    for _optional in (
        "sphinx_automodapi.automodapi",
        "sphinx_automodapi.smart_resolver",
        "pytest_doctestplus.sphinx.doctestplus",
        "sphinx_copybutton",
    ):
        if util.find_spec(_optional.split(".")[0]) is not None:
            extensions.append(_optional)
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3/", None),
        "numpy": ("https://numpy.org/doc/stable/", None),
        "scipy": ("https://docs.scipy.org/doc/scipy/", None),
        "astropy": ("https://docs.astropy.org/en/stable/", None),
    }
    default_role = "obj"
    numpydoc_show_class_members = False
    autosummary_generate = True
    automodapi_toctreedirnm = "api"
    exclude_patterns = ["_build"]
    html_theme = "alabaster"

# -- project ----------------------------------------------------------------

project = "cutana"
author = "The cutana developers"
copyright = f"2026, {author}"  # noqa: A001
try:
    release = metadata.version("cutana")
except metadata.PackageNotFoundError:  # docs built from a source tree
    try:
        from cutana import __version__ as release
    except ImportError:
        release = "unknown"
version = release.split("+")[0]

# -- general ----------------------------------------------------------------

OFFLINE = os.environ.get("CUTANA_DOCS_OFFLINE", "") not in ("", "0")

exclude_patterns = [*exclude_patterns, "**.ipynb_checkpoints"]  # noqa: F405
intersphinx_mapping.update(  # noqa: F405
    {
        "zarr": ("https://zarr.readthedocs.io/en/stable/", None),
        "dask": ("https://docs.dask.org/en/stable/", None),
    }
)
if OFFLINE:
    intersphinx_mapping.clear()  # noqa: F405
# Every reference must resolve; offline, numpy / astropy names cannot.
nitpicky = not OFFLINE
nitpick_ignore = []

# numpydoc: types in docstrings are written as `~numpy.ndarray` etc.
numpydoc_xref_param_type = not OFFLINE
numpydoc_validation_checks = set()  # enforced by numpydoc lint / pre-commit

# automodapi: no inheritance diagrams (needs graphviz), one page per object.
automodapi_inheritance_diagram = False
automodsumm_inherited_members = False

# Reference pages of modules that cannot be imported (not written yet, or a
# broken install) are left out instead of crashing automodapi; each one
# raises a warning, so a ``-W`` build still fails until the module exists.
REFERENCE_MODULES = {
    "cutana": "reference/cutana.rst",
    "cutana.cutout": "reference/cutout.rst",
    "cutana.resample": "reference/resample.rst",
    "cutana.normalization": "reference/normalization.rst",
    "cutana.catalog": "reference/catalog.rst",
    "cutana.tiles": "reference/tiles.rst",
    "cutana.planner": "reference/planner.rst",
    "cutana.executor": "reference/executor.rst",
    "cutana.processing": "reference/processing.rst",
    "cutana.pipeline": "reference/pipeline.rst",
    "cutana.io": "reference/io.rst",
    "cutana.verify": "reference/verify.rst",
    "cutana.cli": "reference/cli.rst",
    "cutana.exceptions": "reference/exceptions.rst",
    "cutana.bench": "reference/bench.rst",
}


def _missing_modules():
    missing = {}
    for module, page in REFERENCE_MODULES.items():
        try:
            importlib.import_module(module)
        except ImportError as exc:
            missing[module] = (page, str(exc))
    return missing


MISSING_MODULES = _missing_modules()
exclude_patterns += [page for page, _ in MISSING_MODULES.values()]
if MISSING_MODULES:
    # the toctree entries of these pages; the warnings below say why
    suppress_warnings = [*globals().get("suppress_warnings", []), "toc.excluded"]

html_title = f"cutana v{release}"
html_static_path = []
if not HAS_SPHINX_ASTROPY:
    html_theme_options = {"description": "Exact, fast, memory-bounded cutouts"}

# -- the ``cutana-help`` directive: CLI reference generated from the parser ---


def _setup_cli_help(app):
    """Register ``.. cutana-help:: [SUBCOMMAND]``, the command's ``--help`` text.

    With the option ``:parser: module.function``, the help of the
    `argparse.ArgumentParser` that function returns is shown instead (for
    example the benchmark harness behind ``cutana bench``).
    """
    from docutils import nodes
    from docutils.parsers.rst import directives
    from sphinx.util import logging
    from sphinx.util.docutils import SphinxDirective

    logger = logging.getLogger(__name__)

    def _main_help(argv):
        from cutana.cli import main

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
            main(argv)
        return buffer.getvalue()

    def _parser_help(dotted):
        module, _, name = dotted.rpartition(".")
        return getattr(importlib.import_module(module), name)().format_help()

    class CutanaHelp(SphinxDirective):
        """Insert the output of ``cutana [SUBCOMMAND] --help`` as a literal block."""

        optional_arguments = 1
        has_content = False
        option_spec = {"parser": directives.unchanged_required}

        def run(self):
            argv = [*self.arguments, "--help"]
            parser = self.options.get("parser")
            what = parser or f"cutana {' '.join(argv)}"
            old_columns = os.environ.get("COLUMNS")
            os.environ["COLUMNS"] = "88"  # argparse wraps to this width
            try:
                text = _parser_help(parser) if parser else _main_help(argv)
            except Exception as exc:  # a broken parser must not crash the build
                logger.warning(
                    "cannot document %r: %r", what, exc, location=self.get_location()
                )
                return []
            finally:
                if old_columns is None:
                    os.environ.pop("COLUMNS", None)
                else:
                    os.environ["COLUMNS"] = old_columns
            text = text.rstrip()
            if not text:
                logger.warning(
                    "%r printed nothing", what, location=self.get_location()
                )
            node = nodes.literal_block(text, text)
            node["language"] = "text"
            return [node]

    app.add_directive("cutana-help", CutanaHelp)


def _warn_missing_modules(app):
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    for module, (page, reason) in MISSING_MODULES.items():
        logger.warning(
            "reference page %s left out: cannot import %s (%s)", page, module, reason
        )


def setup(app):
    """Sphinx hook: project-specific directives and checks."""
    _setup_cli_help(app)
    app.connect("builder-inited", _warn_missing_modules)
