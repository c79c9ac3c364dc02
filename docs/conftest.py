# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
pytest configuration of the documentation's doctests.

pytest-doctestplus (``doctest_plus = "enabled"`` and ``--doctest-rst`` in
``pyproject.toml``) runs the ``>>>`` examples of every ``.rst`` page here as
one doctest per page. Each page runs in its own new, empty working folder, so
the examples can write surveys and outputs to relative paths, exactly as a
reader running them would, without touching the source tree.
"""

import pytest

# conf.py is Sphinx's configuration (it imports sphinx-astropy): not a test
# module. api/ and _build/ hold files Sphinx generates.
collect_ignore = ["conf.py"]
collect_ignore_glob = ["api/*", "_build/*"]


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """Run each documentation doctest in its own empty working folder."""
    monkeypatch.chdir(tmp_path)
