# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of the ESA Cutana side-by-side runner that need no ESA Cutana install."""

import os
import subprocess
import sys

import pytest

from cutana.bench import esa


def test_write_esa_driver_compiles(tmp_path):
    """Test that the written driver is the driver source and compiles."""
    path = esa.write_esa_driver(tmp_path / "esa_driver.py")
    text = (tmp_path / "esa_driver.py").read_text(encoding="utf-8")
    assert path == str(tmp_path / "esa_driver.py")
    assert text == esa.ESA_DRIVER_SOURCE
    compile(text, path, "exec")


def test_write_esa_driver_replaces_existing_file(tmp_path):
    """Test that writing the driver over an existing file replaces it."""
    target = tmp_path / "esa_driver.py"
    target.write_text("garbage that does not compile (", encoding="utf-8")
    esa.write_esa_driver(target)
    compile(target.read_text(encoding="utf-8"), str(target), "exec")


def test_driver_help_runs_without_esa_cutana(tmp_path):
    """Test that the driver parses its options before importing ESA Cutana."""
    driver = esa.write_esa_driver(tmp_path / "esa_driver.py")
    proc = subprocess.run(
        [sys.executable, driver, "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0
    for option in ("--catalogue", "--workers", "--target-size", "--normalize"):
        assert option in proc.stdout


def test_find_esa_python_default_is_none_or_existing():
    """Test that find_esa_python returns None or an existing executable."""
    python = esa.find_esa_python()
    assert python is None or (os.path.isfile(python) and os.access(python, os.X_OK))


def test_find_esa_python_missing_venv(tmp_path):
    """Test that find_esa_python returns None for a folder without a Python."""
    assert esa.find_esa_python(tmp_path / "no-such-venv") is None
    assert esa.find_esa_python(tmp_path) is None


def test_find_esa_python_finds_bin_python(tmp_path):
    """Test that find_esa_python returns bin/python of a venv-like folder."""
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.write_text("#!/bin/sh\n", encoding="utf-8")
    python.chmod(0o755)
    assert esa.find_esa_python(tmp_path) == str(python)


def test_run_esa_cutana_rejects_bad_arguments(tmp_path):
    """Test that run_esa_cutana names the bad value before starting anything."""
    catalogue = tmp_path / "catalogue.csv"
    catalogue.write_text("SourceID,RA,Dec\n", encoding="utf-8")
    with pytest.raises(ValueError, match="workers must be at least 1, got 0"):
        esa.run_esa_cutana(sys.executable, catalogue, tmp_path / "out", workers=0)
    with pytest.raises(FileNotFoundError, match="no-python"):
        esa.run_esa_cutana(
            tmp_path / "no-python", catalogue, tmp_path / "out", workers=1
        )
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        esa.run_esa_cutana(
            sys.executable, tmp_path / "missing.csv", tmp_path / "out", workers=1
        )
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match="is not empty"):
        esa.run_esa_cutana(sys.executable, catalogue, tmp_path / "out", workers=1)
