# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""The documentation builds with Sphinx, warnings as errors."""

import importlib.util
import os
import pathlib
import shutil
import site
import subprocess
import sys

import pytest

import cutana

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
# what the build needs beyond Sphinx itself (the `docs` extra)
_NEEDED = ("sphinx", "numpydoc", "sphinx_automodapi", "pytest_doctestplus")


def _missing():
    return [name for name in _NEEDED if importlib.util.find_spec(name) is None]


def _env():
    """The environment of the build: offline, with the cutana under test."""
    env = dict(os.environ, CUTANA_DOCS_OFFLINE="1")
    root = str(pathlib.Path(cutana.__file__).resolve().parent.parent)
    installed = {str(pathlib.Path(p).resolve()) for p in site.getsitepackages()}
    if root not in installed:  # e.g. an in-place build on PYTHONPATH
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (root, env.get("PYTHONPATH")) if p
        )
    return env


@pytest.mark.slow
@pytest.mark.skipif(
    bool(_missing()),
    reason=f"documentation dependencies not installed ({', '.join(_missing())}); "
    "pip install '.[docs]' to build the docs",
)
@pytest.mark.skipif(not (DOCS / "conf.py").is_file(), reason="no docs/ next to tests/")
def test_docs_build_without_warnings(tmp_path):
    """Test that ``sphinx-build -W --keep-going -b html docs`` succeeds offline."""
    # build a copy, so that the pages automodapi generates stay out of the tree
    src = tmp_path / "docs"
    ignore = shutil.ignore_patterns("_build", "api", "__pycache__")
    shutil.copytree(DOCS, src, ignore=ignore)
    out = tmp_path / "html"
    cmd = [
        sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q",
        "-d", str(tmp_path / "doctrees"), str(src), str(out),
    ]
    # run outside the source tree: `python -m` puts the working folder first on
    # sys.path, where an unbuilt `cutana/` would shadow the installed package
    proc = subprocess.run(
        cmd, env=_env(), capture_output=True, text=True, timeout=600, check=False,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, (
        f"sphinx-build failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    )
    for page in ("index", "getting_started/quickstart", "user_guide/pipeline",
                 "user_guide/cli", "reference/cutana"):
        assert (out / f"{page}.html").is_file(), page
    cli = (out / "user_guide" / "cli.html").read_text(encoding="utf-8")
    # the CLI reference is generated from the parser
    assert "--target-size" in cli and "--flux-conversion" in cli
