# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of the ``cutana bench`` harness (tiny scenarios, no timing assertions)."""

import json
import os

import numpy as np
import pytest
import zarr

from cutana.bench import harness
from cutana.bench.synthetic import make_survey
from cutana.io import open_output
from cutana.pipeline import make_cutouts

RUN_FIELDS = (
    "tool", "workers", "seconds", "n_sources", "n_cutouts", "cutouts_per_second",
    "peak_memory", "memory_samples", "error", "vs_astropy", "vs_esa",
)  # fmt: skip


def test_quick_run_writes_results(tmp_path, capsys):
    """Test that a tiny quick run writes the JSON, the table and the plots."""
    out = tmp_path / "bench"
    code = harness.main([
        "--quick", "--n-sources", "40", "--tile-size", "300",
        "--scenario", "one-tile-many", "--workers", "1", "2", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    for name in (
        "results.json",
        "results.md",
        "throughput.png",
        "scaling.png",
        "memory.png",
    ):
        assert (out / name).is_file(), name
    assert not (out / "data").exists()
    assert not (out / "runs").exists()

    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    for key in (
        "version",
        "quick",
        "workload",
        "environment",
        "scenarios",
        "total_seconds",
        "files",
    ):
        assert key in results
    assert results["quick"] is True
    assert results["workload"]["target_size"] == 150
    for key in ("cpu", "logical_cpus", "numpy", "astropy"):
        assert key in results["environment"]
    (scenario,) = results["scenarios"]
    assert scenario["name"] == "one-tile-many"
    assert scenario["n_sources"] == 40
    assert scenario["tile_size"] == 300
    assert [(r["tool"], r["workers"]) for r in scenario["runs"]] == [
        ("astropy", 1),
        ("cutana", 1),
        ("cutana", 2),
    ]
    for run in scenario["runs"]:
        for key in RUN_FIELDS:
            assert key in run, (run["tool"], key)
        assert run["error"] is None
        assert run["n_sources"] == 40
        assert run["seconds"] > 0
        assert run["cutouts_per_second"] > 0
        assert run["peak_memory"] > 0
        assert all(len(s) == 2 for s in run["memory_samples"])
    astropy_run, cutana_run, cutana_run2 = scenario["runs"]
    assert (cutana_run["backend"], cutana_run2["backend"]) == ("serial", "processes")
    assert scenario["workers_identical"] is True
    assert cutana_run["n_cutouts"] == 40
    assert cutana_run["vs_astropy"] == pytest.approx(
        cutana_run["cutouts_per_second"] / astropy_run["cutouts_per_second"]
    )
    assert cutana_run["vs_esa"] is None
    assert (
        cutana_run["report"]["counts"]["OK"]
        + cutana_run["report"]["counts"].get("PARTIAL_OVERLAP", 0)
        == 40
    )
    agreement = scenario["agreement"]
    assert agreement["rows"] > 0
    assert agreement["max_abs_diff"] <= 1
    assert any("ESA Cutana rows skipped" in n for n in results["notes"])

    table = (out / "results.md").read_text(encoding="utf-8")
    assert "| one-tile-many | cutana | 1 | 40 |" in table
    printed = capsys.readouterr().out
    assert "CPU:" in printed.splitlines()[0]
    assert "| scenario | tool |" in printed


def test_astropy_baseline_matches_cutana(tmp_path):
    """Test that the Astropy baseline's uint8 cutouts equal cutana's within 1."""
    survey = make_survey(
        tmp_path / "survey", n_tiles=1, bands=("VIS", "NIR-H"), tile_size=320,
        n_sources=12, edge_fraction=0.0, off_tile_fraction=0.0, seed=3,
    )  # fmt: skip
    result = harness.astropy_baseline(
        survey.catalogue_path, tmp_path / "astropy.zarr", target_size=150
    )
    assert result["n_cutouts"] == 12
    assert result["n_bands"] == 2
    make_cutouts(
        survey.catalogue_path, tmp_path / "cutana.zarr", target_size=150,
        resample="bilinear", normalize="linear", dtype="uint8",
        flux_conversion=True, progress=False,
    )  # fmt: skip
    ref = zarr.open_array(str(tmp_path / "astropy.zarr"), mode="r")[:]
    out = open_output(tmp_path / "cutana.zarr")
    assert ref.shape == (12, 2, 150, 150)
    assert np.all(np.asarray(out.status[:]) == 0)
    images = np.asarray(out.images[:])
    diff = np.abs(ref.astype(np.int16) - images.astype(np.int16))
    assert diff.max() <= 1
    assert np.mean(diff == 0) > 0.99
    # the stretch uses the whole uint8 range in every cutout and band
    assert np.all(ref.max(axis=(2, 3)) == 255)
    assert np.all(ref.min(axis=(2, 3)) == 0)

    agreement = harness.compare_outputs(
        tmp_path / "astropy.zarr", tmp_path / "cutana.zarr"
    )
    assert agreement["rows"] == 12
    assert agreement["pixels"] == diff.size
    assert agreement["max_abs_diff"] == diff.max()
    assert agreement["n_different"] == np.count_nonzero(diff)


def test_astropy_baseline_subset(tmp_path):
    """Test that the baseline cuts only the first n_sources rows when asked."""
    survey = make_survey(
        tmp_path / "survey", n_tiles=2, bands=("VIS",), tile_size=300,
        n_sources=10, off_tile_fraction=0.0, seed=5,
    )  # fmt: skip
    result = harness.astropy_baseline(
        survey.catalogue_path, tmp_path / "a.zarr", target_size=32, n_sources=4
    )
    assert result["n_sources"] == 10
    assert result["n_cutouts"] == 4
    assert zarr.open_array(str(tmp_path / "a.zarr"), mode="r").shape == (4, 1, 32, 32)


def test_scenario_sizes_and_overrides():
    """Test that scenario sizes follow quick mode and the overrides."""
    paper = harness.SCENARIOS["paper-workload"]
    assert paper.sizes() == (8000, 50000, 2000)
    tile, n, subset = paper.sizes(quick=True)
    assert (tile, n) == (paper.quick_tile_size, paper.quick_n_sources)
    assert subset <= n
    assert paper.sizes(quick=True, tile_size=500, n_sources=20) == (500, 20, 20)
    assert list(harness.SCENARIOS) == [
        "one-tile-many",
        "eight-tiles-few",
        "four-tiles-one-band",
        "paper-workload",
    ]
    for sc in harness.SCENARIOS.values():
        assert sc.size_range == (32, 128)


def test_bad_arguments(tmp_path):
    """Test that unknown scenarios and bad worker counts are rejected by name."""
    with pytest.raises(ValueError, match="unknown scenario 'nope'"):
        harness.run_benchmark(["nope"], out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"workers must be .* got \[0\]"):
        harness.run_benchmark(["paper-workload"], workers=[0], out_dir=tmp_path)
    with pytest.raises(ValueError, match="repeat must be a positive integer, got 0"):
        harness.run_benchmark(["paper-workload"], repeat=0, out_dir=tmp_path)
    with pytest.raises(SystemExit):
        harness.main(["--workers", "0"])
    with pytest.raises(ValueError, match="interval must be a positive number"):
        harness.ProcessTreeSampler(interval=0)
    with pytest.raises(ValueError, match="workers must be a positive integer, got 0"):
        harness.run_cutana("cat.csv", tmp_path / "o", workers=0)


def test_missing_esa_python_is_a_usage_error(tmp_path, capsys):
    """Test that a --cutana-python path that does not exist exits with code 2."""
    code = harness.main(
        ["--cutana-python", str(tmp_path / "no-python"), "--out", str(tmp_path / "b")]
    )
    assert code == 2
    assert "no-python" in capsys.readouterr().err


def test_results_table_ratios():
    """Test that the table shows ratios to Astropy and to ESA Cutana (same workers)."""
    runs = [
        {"tool": "astropy", "workers": 1, "cutouts_per_second": 10.0, "error": None,
         "seconds": 100.0, "n_sources": 1000, "n_cutouts": 100, "extrapolated": True,
         "peak_memory": 2e8},
        {"tool": "cutana", "workers": 1, "cutouts_per_second": 500.0, "error": None,
         "seconds": 2.0, "n_sources": 1000, "n_cutouts": 1000, "peak_memory": 3e8},
        {"tool": "cutana", "workers": 2, "cutouts_per_second": 900.0, "error": None,
         "seconds": 1.1, "n_sources": 1000, "n_cutouts": 1000, "peak_memory": 5e8},
        {"tool": "esa-cutana", "workers": 1, "cutouts_per_second": 50.0, "error": None,
         "seconds": 20.0, "n_sources": 1000, "n_cutouts": 1000, "peak_memory": 9e8},
    ]  # fmt: skip
    harness._ratios(runs)
    assert runs[0]["vs_astropy"] is None
    assert runs[1]["vs_astropy"] == pytest.approx(50.0)
    assert runs[1]["vs_esa"] == pytest.approx(10.0)
    assert runs[2]["vs_esa"] is None  # no ESA Cutana run with 2 workers
    assert runs[3]["vs_astropy"] == pytest.approx(5.0)
    table = harness.results_table({"scenarios": [{"name": "s", "runs": runs}]})
    assert "| s | cutana | 1 | 1000 | 2.00 | 500 | 50.0 | 10.00 | 300 |" in table
    assert "timed on 100 of 1000 sources, extrapolated per cutout" in table


def test_process_tree_sampler_samples_this_process():
    """Test that the sampler records this process's resident memory."""
    import psutil

    sampler = harness.ProcessTreeSampler(interval=0.01)
    sampler.start(os.getpid())
    np.ones(10_000).sum()
    sampler.stop()
    assert sampler.samples
    rss = psutil.Process().memory_info().rss
    assert 0.5 * rss < sampler.peak < 2 * rss


def test_run_cutana_removes_an_old_output_before_timing(tmp_path, monkeypatch):
    """An output left by an earlier repeat is gone before the timed command
    starts (as the ESA Cutana runner does), not removed inside the timing."""
    out = tmp_path / "o.zarr"
    out.mkdir()
    (out / "old").write_text("x")
    seen = []

    def fake_run_timed(command, **kwargs):
        seen.append((out.exists(), "--output" in command))
        return {"seconds": 1.0, "returncode": 1, "timed_out": False, "stdout": "",
                "stderr": "not run", "peak_memory": 0, "memory_samples": []}

    monkeypatch.setattr(harness, "_run_timed", fake_run_timed)
    run = harness.run_cutana(tmp_path / "cat.csv", out, workers=1)
    assert seen == [(False, True)]
    assert run["error"].startswith("exit code 1")


def test_checkout_commit_names_the_checkout_that_tracks_the_file(tmp_path):
    """Test that the benchmark's environment names the git commit of a
    checkout the package is imported from (with ``-dirty`` once a tracked
    file changes), and nothing for an untracked file inside a checkout (a
    package installed there) or a folder outside any checkout."""
    import shutil
    import subprocess

    from cutana.bench.harness import checkout_commit

    if shutil.which("git") is None:
        pytest.skip("git is not installed")

    def git(*args):
        return subprocess.run(
            ["git", "-C", str(repo), *args], check=True, capture_output=True,
            text=True,
        ).stdout.strip()

    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    tracked = repo / "pkg" / "__init__.py"
    tracked.write_text("x = 1\n")
    git("init", "-q")
    git("add", "pkg/__init__.py")
    git("-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-q", "-m",
        "first")
    head = git("rev-parse", "--short=9", "HEAD")
    assert checkout_commit(str(tracked)) == head
    tracked.write_text("x = 2\n")
    assert checkout_commit(str(tracked)) == f"{head}-dirty"
    untracked = repo / "venv" / "site-packages" / "pkg" / "__init__.py"
    untracked.parent.mkdir(parents=True)
    untracked.write_text("x = 1\n")
    assert checkout_commit(str(untracked)) is None
    outside = tmp_path / "elsewhere" / "__init__.py"
    outside.parent.mkdir()
    outside.write_text("")
    assert checkout_commit(str(outside)) is None
