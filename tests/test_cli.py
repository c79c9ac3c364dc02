# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of the ``cutana`` command: options, exit codes, config files."""

import gc
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import cutana
from cutana.bench.synthetic import make_survey
from cutana.cli import _import_pipeline, build_parser, main
from cutana.status import Status


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """A tiny survey: 2 tiles x 1 band, 40 sources with bad rows and edges."""
    return make_survey(
        tmp_path_factory.mktemp("survey"),
        n_tiles=2,
        bands=("VIS",),
        tile_size=160,
        n_sources=40,
        overlap_pixels=20,
        edge_fraction=0.1,
        off_tile_fraction=0.05,
        bad_row_fraction=0.1,
        size_range_pixels=(10, 20),
        seed=5,
    )


def test_help_documents_every_contract_option():
    """Test that ``cutana run --help`` documents every option DESIGN.md requires."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    text = sub.choices["run"].format_help()
    for flag in (
        "--tiles", "--size", "--target-size", "--resample", "--normalize", "--dtype",
        "--flux-conversion", "--zeropoint-keyword", "--format", "--workers",
        "--memory-limit", "--backend", "--scheduler", "--resume", "--config",
        "--output",
    ):
        assert flag in text
    for choice in ("nearest", "bilinear", "area", "asinh", "zscale", "uint16", "dask"):
        assert choice in text


def test_installed_command_runs():
    """Test that the installed ``cutana`` entry point answers --version."""
    exe = shutil.which("cutana")
    if exe is None:
        pytest.skip("the cutana command is not on PATH (package not installed)")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"cutana {cutana.__version__}"


def test_python_dash_m_cutana_is_the_command(survey, tmp_path):
    """Test that ``python -m cutana`` is the ``cutana`` command: it answers
    --version, and a run with worker processes (which must not run the
    command again when they import the main module) writes what the same
    run in this process writes."""
    env = dict(os.environ)
    # the folder of the cutana imported here (a source tree, or site-packages)
    root = os.path.dirname(os.path.dirname(os.path.abspath(cutana.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    # (in a folder of no cutana: ``-m`` puts the working folder first)
    out = subprocess.run([sys.executable, "-m", "cutana", "--version"], env=env,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"cutana {cutana.__version__}"
    args = [survey.catalogue_path, "--size", "15", "--no-progress"]
    run = subprocess.run(
        [sys.executable, "-m", "cutana", "run", *args, "--output",
         str(tmp_path / "m.zarr"), "--workers", "2", "--backend", "processes"],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert main(["run", *args, "--output", str(tmp_path / "s.zarr")]) == 0
    m, s = cutana.open(tmp_path / "m.zarr"), cutana.open(tmp_path / "s.zarr")
    np.testing.assert_array_equal(np.asarray(m.status), np.asarray(s.status))
    np.testing.assert_array_equal(np.asarray(m.images), np.asarray(s.images))


def test_run_exit_zero_and_output(survey, tmp_path, capsys):
    """Test that a clean run exits 0 and accounts for every row in status."""
    out = tmp_path / "o.zarr"
    code = main(["run", survey.catalogue_path, "--output", str(out), "--size", "15",
                 "--no-progress"])
    assert code == 0
    status = np.asarray(cutana.open(out).status)
    assert len(status) == survey.n_sources
    assert set(np.unique(status)) <= {0, 1, 2, 3}
    assert (status == Status.BAD_ROW).sum() >= 1
    err = capsys.readouterr().err
    assert "cutouts/s" in err and "peak memory" in err


def test_run_with_tiles_glob_and_fits(survey, tmp_path):
    """Test --tiles with a glob and --format fits."""
    out = tmp_path / "f"
    folder = os.path.dirname(survey.tile_paths[0][0])
    code = main(["run", survey.catalogue_path, "-o", str(out), "--tiles",
                 os.path.join(folder, "*.fits"), "--size", "15", "--format", "fits",
                 "--no-progress"])
    assert code == 0
    assert (out / "index.ecsv").exists()


def _bare_wcs(t):
    """The WCS of tile ``t`` of 60 x 80 pixels, 0.01 deg apart in RA."""
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0 + 0.01 * t, 2.0]
    w.wcs.crpix = [40.5, 30.5]
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    return w


def test_run_on_tiles_that_name_no_band(tmp_path):
    """Test that --tiles matching several single-band tiles written by astropy
    with a bare WCS (no band keyword, no Euclid name) cuts every source
    that lies on one, as astropy's Cutout2D of its tile does."""
    from astropy.coordinates import SkyCoord
    from astropy.io import fits
    from astropy.nddata import Cutout2D
    from astropy.table import Table

    rng = np.random.default_rng(5)
    tiles = []
    for t in range(3):
        w = _bare_wcs(t)
        data = rng.normal(size=(60, 80)).astype(">f4")
        path = tmp_path / f"field{t}.fits"
        fits.PrimaryHDU(data, header=w.to_header()).writeto(path)
        tiles.append((w, data))
    # sources well inside each tile (8 px from the edges)
    on = (0, 1, 2, 2)
    sky = [tiles[t][0].pixel_to_world(*rng.uniform((8, 8), (71, 51))) for t in on]
    Table({"id": [1, 2, 3, 4], "ra": [s.ra.deg for s in sky],
           "dec": [s.dec.deg for s in sky]}).write(tmp_path / "cat.csv")
    out = tmp_path / "o.zarr"
    code = main(["run", str(tmp_path / "cat.csv"), "-o", str(out), "--tiles",
                 str(tmp_path / "field*.fits"), "--size", "9", "--no-progress"])
    assert code == 0
    result = cutana.open(out)
    assert result.bands == ["field"]
    assert np.asarray(result.status).tolist() == [0, 0, 0, 0]
    for i, t in enumerate(on):
        w, data = tiles[t]
        ref = Cutout2D(data, SkyCoord(sky[i]), 9, wcs=w)
        np.testing.assert_array_equal(np.asarray(result[i])[0], ref.data)


@pytest.mark.parametrize("pattern", ["{band}/T{t}.fits", "sim_{band}_{t}.fits"])
def test_run_on_band_files_that_name_no_band(tmp_path, pattern):
    """Test that --tiles over band files that name no band, in one folder per
    band or with a hyphenated band in the name, cuts every band of every
    tile as astropy's Cutout2D of that band's file does."""
    from astropy.coordinates import SkyCoord
    from astropy.io import fits
    from astropy.nddata import Cutout2D
    from astropy.table import Table

    rng = np.random.default_rng(7)
    bands = ("VIS", "NIR-H")
    tiles = []
    for t in range(2):
        w = _bare_wcs(t)
        data = {}
        for band in bands:
            path = tmp_path / pattern.format(band=band, t=t)
            path.parent.mkdir(exist_ok=True)
            data[band] = rng.normal(size=(60, 80)).astype(">f4")
            fits.PrimaryHDU(data[band], header=w.to_header()).writeto(path)
        tiles.append((w, data))
    on = (0, 1, 1)
    sky = [tiles[t][0].pixel_to_world(*rng.uniform((8, 8), (71, 51))) for t in on]
    Table({"id": [1, 2, 3], "ra": [s.ra.deg for s in sky],
           "dec": [s.dec.deg for s in sky]}).write(tmp_path / "cat.csv")
    out = tmp_path / "o.zarr"
    glob = str(tmp_path / pattern.format(band="*", t="*"))
    code = main(["run", str(tmp_path / "cat.csv"), "-o", str(out), "--tiles", glob,
                 "--size", "9", "--bands", *bands, "--no-progress"])
    assert code == 0
    result = cutana.open(out)
    assert result.bands == list(bands)
    assert np.asarray(result.status).tolist() == [0, 0, 0]
    for i, t in enumerate(on):
        w, data = tiles[t]
        for c, band in enumerate(bands):
            ref = Cutout2D(data[band], SkyCoord(sky[i]), 9, wcs=w)
            np.testing.assert_array_equal(np.asarray(result[i])[c], ref.data)


def _one_tile_and_sources(tmp_path, seed):
    """A 60 x 80 tile ``t.fits`` of noise and 5 sky positions well inside it:
    ``(wcs, data, skycoord)``."""
    from astropy.io import fits

    rng = np.random.default_rng(seed)
    w = _bare_wcs(0)
    data = rng.normal(size=(60, 80)).astype(">f4")
    fits.PrimaryHDU(data, header=w.to_header()).writeto(tmp_path / "t.fits")
    return w, data, w.pixel_to_world(*rng.uniform((8, 8), (71, 51), (5, 2)).T)


def _assert_cut_as_cutout2d(tmp_path, catalogue, w, data, positions):
    """Run ``cutana run`` on ``catalogue`` over ``t.fits`` (9 px cutouts) and
    check every cutout against astropy's Cutout2D at ``positions``."""
    from astropy.nddata import Cutout2D

    out = tmp_path / "o.zarr"
    code = main(["run", str(catalogue), "-o", str(out), "--tiles",
                 str(tmp_path / "t.fits"), "--size", "9", "--no-progress"])
    assert code == 0
    result = cutana.open(out)
    assert np.asarray(result.status).tolist() == [0] * len(positions)
    for i, where in enumerate(positions):
        ref = Cutout2D(data, where, 9, wcs=w)
        np.testing.assert_array_equal(np.asarray(result[i])[0], ref.data)


def test_run_on_sexagesimal_coordinates(tmp_path):
    """Test that a catalogue of sexagesimal RA and Dec is cut where
    astropy's SkyCoord of the same text places the sources."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord
    from astropy.table import Table

    w, data, sky = _one_tile_and_sources(tmp_path, seed=3)
    ra = sky.ra.to_string(u.hourangle, sep=":", precision=3)
    dec = sky.dec.to_string(u.deg, sep=" ", precision=2, alwayssign=True)
    Table({"id": np.arange(5), "ra": ra, "dec": dec}).write(tmp_path / "cat.csv")
    _assert_cut_as_cutout2d(tmp_path, tmp_path / "cat.csv", w, data,
                            SkyCoord(ra, dec, unit=(u.hourangle, u.deg)))


def test_run_on_a_skycoord_column(tmp_path):
    """Test that an ECSV catalogue whose positions are a SkyCoord column in
    galactic coordinates is cut where astropy's Cutout2D places them."""
    from astropy.table import QTable

    w, data, sky = _one_tile_and_sources(tmp_path, seed=4)
    QTable({"name": list("abcde"), "pos": sky.galactic}).write(tmp_path / "cat.ecsv")
    _assert_cut_as_cutout2d(tmp_path, tmp_path / "cat.ecsv", w, data, sky.galactic)


def test_existing_output_is_usage_error(survey, tmp_path, capsys):
    """Test that writing into an existing output without --resume exits 2."""
    out = tmp_path / "o.zarr"
    args = ["run", survey.catalogue_path, "-o", str(out), "--size", "15",
            "--no-progress"]
    assert main(args) == 0
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0  # already complete: nothing to do


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--resample", "bilinear"], "needs target_size"),
        (["--dtype", "uint8"], "needs a stretch"),
        (["--memory-limit", "12 parsecs"], "cannot parse memory size"),
        (["--normalize", "linear", "--crop", "10"], "crop of 10 pixels is larger"),
    ],
)
def test_config_errors_exit_two(survey, tmp_path, capsys, extra, message):
    """Test that inconsistent options exit 2 with a message naming the problem."""
    code = main(["run", survey.catalogue_path, "-o", str(tmp_path / "x"), "--size", "9",
                 "--no-progress", *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_argparse_errors_exit_two(survey, tmp_path):
    """Test that unknown options and bad values exit 2."""
    for extra in (["--normalise", "asinh"], ["--workers", "0"],
                  ["--resample", "cubic"]):
        with pytest.raises(SystemExit) as exc:
            main(["run", survey.catalogue_path, "-o", str(tmp_path / "x"), *extra])
        assert exc.value.code == 2


def test_missing_catalogue_exit_two(tmp_path, capsys):
    """Test that a missing catalogue is a usage error naming the file."""
    code = main(["run", str(tmp_path / "nope.csv"), "-o", str(tmp_path / "x"),
                 "--size", "9"])
    assert code == 2
    assert "nope.csv" in capsys.readouterr().err


def test_an_output_that_cannot_be_made_exits_two(survey, tmp_path, capsys):
    """Test that an output folder that cannot be made (here: under a file)
    is a usage error found before anything is read, naming the path, and
    that a nested output that can be made is made."""
    (tmp_path / "afile").write_text("")
    below = tmp_path / "afile" / "sub" / "o"
    code = main(["run", survey.catalogue_path, "-o", str(below), "--size", "9",
                 "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot be made: Not a directory" in err
    assert "afile" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    nested = tmp_path / "new" / "deeper" / "out"
    assert main(["run", survey.catalogue_path, "-o", str(nested), "--size", "9",
                 "--no-progress"]) == 0
    assert len(cutana.open(nested)) == 40


def test_config_file_equivalent_to_flags(survey, tmp_path):
    """Test that a TOML config gives the same output as the same flags."""
    cfg = tmp_path / "run.toml"
    cfg.write_text('size = 13\nnormalize = "sqrt"\ndtype = "uint16"\n')
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    assert main(["run", survey.catalogue_path, "-o", str(a), "--config", str(cfg),
                 "--no-progress"]) == 0
    assert main(["run", survey.catalogue_path, "-o", str(b), "--size", "13",
                 "--normalize", "sqrt", "--dtype", "uint16", "--no-progress"]) == 0
    np.testing.assert_array_equal(cutana.open(a).images[:], cutana.open(b).images[:])
    assert cutana.open(a).images.dtype == np.uint16


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('flux_conversion = "false"', "invalid flux_conversion: 'false'; expected"),
        ('normalize = "linear"\npercentile = "abc"', "invalid percentile: 'abc'"),
        ('normalize = "asinh"\nstretch_a = "x"', "invalid stretch_a: 'x'"),
        ("tiles = 5", "invalid tiles: 5"),
        ("zeropoint_keyword = 5", "invalid zeropoint_keyword: 5"),
        ('normalize = "zscale"\nzscale_samples = 10.5', "invalid zscale_samples: 10.5"),
        ("max_sources_per_job = 2.5", "invalid max_sources_per_job: 2.5"),
        ('normalize = "linear"\ncrop = "half"', "invalid crop: 'half'"),
        ("channel_weights = [true]", "invalid channel_weights: [True]"),
        ('dec_column = ""', "invalid dec_column: ''"),
        # a string is not false: "no" replaced an output (bool("no"))
        ('overwrite = "no"', "invalid overwrite: 'no'; expected true or false"),
        ("resume = 1", "invalid resume: 1; expected true or false"),
        ('backend = "dask"\nscheduler = 5', "invalid scheduler: 5"),
    ],
)
def test_config_file_values_are_checked(survey, tmp_path, capsys, toml, message):
    """Test that values of a config file that the command's parser would refuse
    are usage errors naming the option and value (not a traceback, a silent
    truth value or a rounded number), and that nothing is written."""
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"size = 9\n{toml}\n")
    out = tmp_path / "x"
    code = main(["run", survey.catalogue_path, "-o", str(out), "--config", str(cfg),
                 "--no-progress"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_options_compare_equal_from_flags_file_and_keywords(survey, tmp_path):
    """Test that an option given as a flag, in a config file or as a keyword
    is recorded as the same value (a whole-number percentile, one band or
    tile glob as a string, a whole-number crop in pixels), so that one form
    can resume a run started with another."""
    tiles = os.path.join(os.path.dirname(survey.catalogue_path), "*.fits")
    flag = tmp_path / "flag.zarr"
    assert main(["run", survey.catalogue_path, "-o", str(flag), "--size", "15",
                 "--normalize", "linear", "--percentile", "95", "--crop", "5",
                 "--bands", "VIS", "--tiles", tiles, "--no-progress"]) == 0
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'size = 15\nnormalize = "linear"\npercentile = 95\ncrop = 5\n'
                   f'bands = "VIS"\ntiles = "{tiles}"\n')
    file = tmp_path / "file.zarr"
    assert main(["run", survey.catalogue_path, "-o", str(file), "--config", str(cfg),
                 "--no-progress"]) == 0
    api = tmp_path / "api.zarr"
    cutana.make_cutouts(survey.catalogue_path, api, size=15, normalize="linear",
                        percentile=95, crop=5, bands="VIS", tiles=tiles, progress=False)
    configs = [cutana.open(out).config for out in (flag, file, api)]
    assert configs[0] == configs[1] == configs[2]
    assert configs[0]["crop"] == 5 and isinstance(configs[0]["crop"], int)
    expected = cutana.open(flag).images[:]
    for out in (file, api):
        np.testing.assert_array_equal(cutana.open(out).images[:], expected)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('catalogue = ["a.csv"]', "invalid catalogue in the --config file: ['a.csv']"),
        ('catalogue = "cat.csv"\noutput = 5', "invalid output in the --config file: 5"),
    ],
)
def test_config_file_paths_are_checked(tmp_path, capsys, toml, message):
    """Test that a catalogue or output of the config file that is not a
    path is a usage error naming it (it was a traceback, exit 1)."""
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"size = 9\n{toml}\n")
    assert main(["run", "--config", str(cfg), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_config_file_typo_suggests_name(survey, tmp_path, capsys):
    """Test that an unknown config key is an error suggesting the closest option."""
    cfg = tmp_path / "run.toml"
    cfg.write_text("normalise = 'asinh'\n")
    with pytest.raises(SystemExit) as exc:
        main(["run", survey.catalogue_path, "-o", str(tmp_path / "x"), "--config",
              str(cfg)])
    assert exc.value.code == 2
    assert "did you mean 'normalize'" in capsys.readouterr().err


def test_size_true_is_not_one_pixel(survey, tmp_path, capsys):
    """Test that a size of ``true`` (config file) or ``True`` (keyword) is a
    usage error, as ``--size true`` is, not cutouts of one pixel."""
    from cutana.exceptions import ConfigError

    cfg = tmp_path / "run.toml"
    cfg.write_text("size = true\n")
    out = tmp_path / "x"
    code = main(["run", survey.catalogue_path, "-o", str(out), "--config", str(cfg),
                 "--no-progress"])
    assert code == 2
    assert "invalid size: True; expected a positive number" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="invalid size: True"):
        cutana.make_cutouts(survey.catalogue_path, out, size=True, progress=False)
    assert not out.exists()


@pytest.mark.parametrize(
    ("toml", "keys"),
    [
        ("target_size = 10\ntarget-size = 12", "'target_size' and 'target-size'"),
        ("target-size = 12\ntarget_size = 10", "'target-size' and 'target_size'"),
        ("target_size = 10\n[run]\ntarget_size = 12",
         "'target_size' and 'run.target_size'"),
    ],
)
def test_config_file_option_set_twice(survey, tmp_path, capsys, toml, keys):
    """Test that an option set twice in a config file (both spellings, or at
    the top level and in ``[run]``) is a usage error naming both keys, as
    TOML itself refuses a key written twice (the last one had won)."""
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"size = 9\n{toml}\n")
    out = tmp_path / "x"
    with pytest.raises(SystemExit) as exc:
        main(["run", survey.catalogue_path, "-o", str(out), "--config", str(cfg)])
    assert exc.value.code == 2
    assert f"keys {keys} both set 'target_size'" in capsys.readouterr().err
    assert not out.exists()


def test_column_options_name_other_columns(survey, tmp_path, capsys):
    """Test that --id-column/--ra-column/--dec-column (also as config keys
    and keywords) read a catalogue whose columns have other names, which
    the error for such a catalogue suggests, with the output of the
    catalogue under the usual names."""
    from astropy.table import Table

    table = Table.read(survey.catalogue_path, format="ascii.csv")
    table.rename_columns(["SourceID", "RA", "Dec"], ["NAME", "ALPHA", "DELTA"])
    renamed = tmp_path / "renamed.csv"
    table.write(renamed, format="ascii.csv")
    reference = tmp_path / "ref.zarr"
    assert main(["run", survey.catalogue_path, "-o", str(reference), "--size", "11",
                 "--no-progress"]) == 0
    tiles = os.path.join(os.path.dirname(survey.catalogue_path), "*.fits")
    assert main(["run", str(renamed), "-o", str(tmp_path / "no"), "--size", "11",
                 "--tiles", tiles, "--no-progress"]) == 2
    assert "(--ra-column ALPHA on the command line)" in capsys.readouterr().err
    flag = tmp_path / "flag.zarr"
    assert main(["run", str(renamed), "-o", str(flag), "--size", "11", "--tiles",
                 tiles, "--id-column", "NAME", "--ra-column", "ALPHA",
                 "--dec-column", "DELTA", "--no-progress"]) == 0
    cfg = tmp_path / "run.toml"
    cfg.write_text('id-column = "NAME"\nra_column = "ALPHA"\ndec_column = "DELTA"\n')
    file = tmp_path / "file.zarr"
    assert main(["run", str(renamed), "-o", str(file), "--size", "11", "--tiles",
                 tiles, "--config", str(cfg), "--no-progress"]) == 0
    api = tmp_path / "api.zarr"
    cutana.make_cutouts(renamed, api, size=11, tiles=tiles, id_column="NAME",
                        ra_column="ALPHA", dec_column="DELTA", progress=False)
    ref = cutana.open(reference)
    for out in (flag, file, api):
        got = cutana.open(out)
        np.testing.assert_array_equal(got.images[:], ref.images[:])
        np.testing.assert_array_equal(got.status[:], ref.status[:])
        np.testing.assert_array_equal(got.source_id[:], ref.source_id[:])
        assert got.config["ra_column"] == "ALPHA"
    assert "ra_column" not in ref.config  # the usual names: as before
    assert main(["verify", str(flag)]) == 0  # reads the catalogue as the run did


@pytest.mark.parametrize("entry", ["make_cutouts", "plan_cutouts", "iter_cutouts"])
def test_unknown_keyword_suggests_the_option(survey, tmp_path, entry):
    """Test that a misspelt keyword of the Python API is a ConfigError with
    the closest option, as for a config file (it was a TypeError of an
    internal class)."""
    from cutana.exceptions import ConfigError

    call = getattr(cutana, entry)
    args = (survey.catalogue_path, tmp_path / "x") if entry == "make_cutouts" else (
        survey.catalogue_path,)
    match = r"unknown option 'sise'; did you mean 'size'\?"
    with pytest.raises(ConfigError, match=match):
        result = call(*args, sise=16)
        next(iter(result))
    assert not (tmp_path / "x").exists()


def test_flags_override_config(survey, tmp_path):
    """Test that a command-line flag wins over the config file."""
    cfg = tmp_path / "run.toml"
    cfg.write_text("size = 13\n")
    out = tmp_path / "o.zarr"
    assert main(["run", survey.catalogue_path, "-o", str(out), "--config", str(cfg),
                 "--size", "11", "--no-progress"]) == 0
    assert cutana.open(out).images.shape[2:] == (11, 11)


def test_no_flux_conversion_wins_over_the_config_file(survey, tmp_path):
    """Test that ``--no-flux-conversion`` turns off a config file's
    ``flux_conversion = true`` (no flag could), and ``--flux-conversion``
    turns it on: the values are those of runs without and with it."""
    cfg = tmp_path / "run.toml"
    cfg.write_text("size = 9\nflux_conversion = true\n")
    outs = {}
    for name, extra in (("off", ["--no-flux-conversion"]), ("on", [])):
        outs[name] = tmp_path / f"{name}.zarr"
        assert main(["run", survey.catalogue_path, "-o", str(outs[name]),
                     "--config", str(cfg), "--no-progress", *extra]) == 0
    plain = tmp_path / "plain.zarr"
    assert main(["run", survey.catalogue_path, "-o", str(plain), "--size", "9",
                 "--no-progress"]) == 0
    converted = tmp_path / "converted.zarr"
    assert main(["run", survey.catalogue_path, "-o", str(converted), "--size", "9",
                 "--no-progress", "--flux-conversion"]) == 0
    same = [("off", plain), ("on", converted)]
    for name, ref in same:
        np.testing.assert_array_equal(cutana.open(outs[name]).images[:],
                                      cutana.open(ref).images[:])
    assert not np.array_equal(cutana.open(plain).images[:],
                              cutana.open(converted).images[:])


@pytest.mark.parametrize(
    ("args", "level"),
    [(["plan", "-v"], 1), (["-vv", "plan"], 2), (["plan"], 0),
     (["-v", "plan", "-vv"], 2)],
)
def test_verbose_after_the_sub_command(survey, monkeypatch, args, level):
    """Test that ``-v`` is taken after the sub-command too (it was an
    unrecognised argument there), and before it as before."""
    from cutana import cli

    seen = []
    monkeypatch.setattr(cli, "_setup_logging", seen.append)
    assert main([*args, survey.catalogue_path, "--size", "9"]) == 0
    assert seen == [level]


def test_plan_prints_summary_without_cutting(survey, tmp_path, capsys):
    """Test that ``cutana plan`` prints jobs and memory estimate and writes nothing."""
    code = main(["plan", survey.catalogue_path, "--size", "15", "--memory-limit",
                 "2GB"])
    assert code == 0
    out = capsys.readouterr().out
    assert "jobs" in out and "estimated peak" in out and "2.0 GB" in out
    assert "bands               VIS\n" in out


def test_plan_progress_bars(survey, monkeypatch, capsys):
    """Test that planning shows its reading bars when asked (past their
    delays, here 0 s) and ``cutana plan --no-progress`` shows none."""
    import cutana.catalog as catalog_module
    import cutana.tiles as tiles_module
    from cutana.pipeline import plan_cutouts

    monkeypatch.setattr(catalog_module, "READ_PROGRESS_DELAY", 0.0)
    monkeypatch.setattr(tiles_module, "INDEX_PROGRESS_DELAY", 0.0)
    plan_cutouts(survey.catalogue_path, size=15, progress=True)
    err = capsys.readouterr().err
    assert "reading catalogue" in err and "indexing tiles" in err
    plan_cutouts(survey.catalogue_path, size=15, progress=False)
    assert "reading catalogue" not in capsys.readouterr().err
    # the command: bars on a terminal, unless --no-progress
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["plan", survey.catalogue_path, "--size", "15"]) == 0
    assert "indexing tiles" in capsys.readouterr().err
    assert main(["plan", survey.catalogue_path, "--size", "15", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "reading catalogue" not in err and "indexing tiles" not in err


def test_plan_prints_bands_in_channel_order(tmp_path, capsys):
    """Test that ``cutana plan`` names the bands in channel order."""
    two = make_survey(tmp_path, n_tiles=1, bands=("VIS", "NIR-H"), tile_size=64,
                      n_sources=5, size_range_pixels=(8, 12), seed=2)
    for order in (["VIS", "NIR-H"], ["NIR-H", "VIS"]):
        assert main(["plan", two.catalogue_path, "--size", "9", "--bands", *order]) == 0
        out = capsys.readouterr().out
        assert f"bands               {order[0]}, {order[1]}\n" in out


def test_verify_detects_tampering(survey, tmp_path, capsys):
    """Test that ``cutana verify`` passes a fresh output and fails a damaged one."""
    out = tmp_path / "o.zarr"
    assert main(["run", survey.catalogue_path, "-o", str(out), "--size", "15",
                 "--no-progress"]) == 0
    assert main(["verify", str(out)]) == 0
    chunk = next(p for p in (out / "images").rglob("*")
                 if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 1


def test_verify_of_the_folder_above_an_output_names_it(survey, tmp_path, capsys):
    """Test that ``cutana verify`` and ``cutana.open`` of a folder that is
    no output, but holds outputs (as ``cutana demo --output DIR`` leaves
    ``DIR/cutouts``), name the outputs inside it."""
    top = tmp_path / "top"
    (top / "notes").mkdir(parents=True)
    assert main(["verify", str(top)]) == 1
    alone = f"{top} is not a cutana output (no zarr.json and no index.ecsv)"
    assert capsys.readouterr().out.strip() == alone
    for name, fmt in [("b.zarr", "zarr"), ("a", "fits")]:
        assert main(["run", survey.catalogue_path, "-o", str(top / name),
                     "--size", "15", "--format", fmt, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["verify", str(top)]) == 1
    both = f"{alone}, but {top / 'a'}, {top / 'b.zarr'} are"
    assert capsys.readouterr().out.strip() == both
    shutil.rmtree(top / "a")
    with pytest.raises(FileNotFoundError) as exc:
        cutana.open(top)
    assert str(exc.value) == f"{alone}, but {top / 'b.zarr'} is"
    with pytest.raises(FileNotFoundError, match="^[^,]*$"):
        cutana.open(tmp_path / "nowhere")


@pytest.mark.parametrize("fmt", ["zarr", "fits"])
def test_verify_of_an_output_made_from_a_table_in_memory(
    survey, tmp_path, caplog, fmt
):
    """Test that ``cutana verify`` of a complete output made from a Table in
    memory (which records no catalogue) exits 0 with a warning that the
    catalogue was not checked (it failed, "no catalogue recorded"), still
    finds a damaged chunk, and checks against a catalogue given."""
    from astropy.table import Table

    import cutana

    table = Table.read(survey.catalogue_path, format="ascii.csv")
    out = tmp_path / "o"
    cutana.make_cutouts(table, out, size=15, format=fmt, progress=False)
    with caplog.at_level("WARNING", logger="cutana.verify"):
        assert main(["verify", str(out)]) == 0
    assert f"{out}: checked without its catalogue, which it does not record" in (
        caplog.text)
    assert main(["verify", str(out), "--catalogue", survey.catalogue_path]) == 0
    if fmt == "zarr":
        chunk = next(p for p in (out / "images").rglob("*")
                     if p.is_file() and p.name != "zarr.json")
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
        assert main(["verify", str(out)]) == 1


def test_verify_finds_a_bad_row_that_neither_catalogue_nor_tiles_explain(
    survey, tmp_path
):
    """Test that ``cutana verify`` still reports a BAD_ROW row whose
    catalogue row is valid when planning the run again with its tiles does
    not make it bad either (it now asks the tiles before it reports)."""
    import zarr

    from cutana.verify import verify

    out = tmp_path / "o.zarr"
    assert main(["run", survey.catalogue_path, "-o", str(out), "--size", "15",
                 "--no-progress"]) == 0
    status = zarr.open_array(out / "status", mode="r+")
    r = int(np.flatnonzero(status[:] == 0)[0])
    status[r] = 3  # BAD_ROW
    assert f"row {r}: status BAD_ROW but the catalogue row is valid" in verify(out)


def test_verify_checks_the_recorded_status_counts(survey, tmp_path, capsys):
    """Test that ``cutana verify`` compares a finished store's
    ``status_counts`` attribute with its status array (an edited count
    passed)."""
    import json

    out = tmp_path / "o.zarr"
    assert main(["run", survey.catalogue_path, "-o", str(out), "--size", "15",
                 "--no-progress"]) == 0
    meta = json.loads((out / "zarr.json").read_text())
    counts = meta["attributes"]["status_counts"]
    counts["OK"] += 1
    counts["BAD_ROW"] -= 1
    (out / "zarr.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    assert "the attribute status_counts" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["other_file", "shared_file", "status"])
def test_verify_checks_fits_files_against_the_index(survey, tmp_path, capsys, damage):
    """Test that ``cutana verify`` of a FITS output checks each file's ROW,
    STATUS and SRCID against ``index.ecsv``, and that no two rows name one
    file: a file replaced by another row's, two rows sharing a file and a
    status changed in the index all passed."""
    import shutil

    from astropy.table import Table

    out = tmp_path / "f"
    assert main(["run", survey.catalogue_path, "-o", str(out), "--size", "15",
                 "--format", "fits", "--no-progress"]) == 0
    assert main(["verify", str(out)]) == 0
    index = Table.read(out / "index.ecsv", format="ascii.ecsv")
    a, b = [int(r) for r in np.flatnonzero(np.asarray(index["status"]) == 0)[:2]]
    words = "are not the index's"
    if damage == "other_file":
        shutil.copy(out / index["file"][b], out / index["file"][a])
    else:
        if damage == "shared_file":
            index["file"][a] = index["file"][b]
            words = f"all name the file {index['file'][b]}"
        else:
            index["status"][a] = 1
        index.write(out / "index.ecsv", format="ascii.ecsv", overwrite=True)
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    assert words in capsys.readouterr().out


@pytest.mark.parametrize(("array", "where", "problem"), [
    ("status", 5, "the per-row arrays cannot be read"),  # inside the compressed header
    ("ra", None, "position ("),  # a value, in the middle of the chunk
])
def test_verify_reports_damaged_row_arrays(survey, tmp_path, capsys, array, where,
                                           problem):
    """Test that a damaged chunk of a per-row array is a listed problem: an
    undecodable one without a traceback, a changed position against the
    catalogue's."""
    out = tmp_path / "o.zarr"
    assert main(["run", survey.catalogue_path, "-o", str(out), "--size", "15",
                 "--no-progress"]) == 0
    chunk = out / array / "c.0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2 if where is None else where] ^= 0xFF
    chunk.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    assert problem in capsys.readouterr().out


def test_unwritable_report_json_is_refused_before_the_run(survey, tmp_path, capsys):
    """Test that --report-json in a missing folder is a usage error found
    before anything is cut, not a traceback after the run."""
    out = tmp_path / "o.zarr"
    code = main(["run", survey.catalogue_path, "-o", str(out), "--size", "15",
                 "--no-progress", "--report-json", str(tmp_path / "no" / "r.json")])
    assert code == 2
    assert "--report-json" in capsys.readouterr().err
    assert not out.exists()


def test_demo_into_a_file_is_a_usage_error(tmp_path, capsys):
    """Test that `cutana demo --output FILE` exits 2 naming the file."""
    path = tmp_path / "afile"
    path.write_text("x")
    assert main(["demo", "--output", str(path)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_verify_detects_bad_row_marked_ok(survey, tmp_path):
    """Test that a bad catalogue row stored as OK is reported by verify."""
    import zarr

    out = tmp_path / "o.zarr"
    assert main(["run", survey.catalogue_path, "-o", str(out), "--size", "15",
                 "--no-progress"]) == 0
    status = zarr.open_array(out / "status", mode="r+")
    values = status[:]
    bad = int(np.flatnonzero(values == Status.BAD_ROW)[0])
    values[bad] = Status.OK
    status[:] = values
    from cutana.verify import verify

    problems = verify(out)
    assert any(f"row {bad}" in p for p in problems)


def test_module_entry_point(survey, tmp_path):
    """Test that ``python -m cutana.cli run`` works as a subprocess, exit code
    included."""
    out = tmp_path / "sub.zarr"
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "cutana.cli", "run", survey.catalogue_path, "-o",
         str(out), "--size", "15", "--workers", "2"],
        capture_output=True, text=True, env=env, cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stderr
    # the process ends without the interpreter's teardown: the report's last
    # line must still have been flushed, and the store finished
    assert "peak memory" in proc.stderr and proc.stderr.endswith("\n")
    from cutana.verify import verify

    assert verify(out) == []
    # a usage error still exits 2 with a message
    bad = subprocess.run(
        [sys.executable, "-m", "cutana.cli", "run", survey.catalogue_path, "-o",
         str(tmp_path / "bad.zarr"), "--size", "-3"],
        capture_output=True, text=True, env=env, cwd=str(tmp_path),
    )
    assert bad.returncode == 2
    assert "size" in bad.stderr


def test_command_imports_stay_light(tmp_path):
    """Test that the command and the pipeline do not load astropy.nddata.

    The cutout classes (and so astropy.nddata and scipy) are loaded only
    when first used, and then equal astropy's own names.
    """
    code = (
        "import sys, cutana.cli, cutana.pipeline\n"
        "heavy = [m for m in ('astropy.nddata', 'cutana.cutout') if m in sys.modules]\n"
        "import cutana, cutana.exceptions, astropy.nddata\n"
        "assert cutana.NoOverlapError is astropy.nddata.NoOverlapError\n"
        "assert cutana.exceptions.PartialOverlapError is "
        "astropy.nddata.PartialOverlapError\n"
        "assert issubclass(cutana.Cutout2D, astropy.nddata.Cutout2D)\n"
        "assert all(getattr(cutana, name) is not None for name in cutana.__all__)\n"
        "import cutana.cutout\n"
        "assert set(cutana._CUTOUT_NAMES) == set(cutana.cutout.__all__)\n"
        "print(heavy)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path)
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("enabled", [True, False])
def test_pipeline_import_leaves_the_collector_as_it_was(enabled):
    # the commands import the pipeline with the cyclic collector paused
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        module = _import_pipeline()
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
    assert module is sys.modules["cutana.pipeline"]


def test_fits_run_refuses_bands_that_differ_only_in_case(tmp_path, capsys):
    # FITS extension names are upper-cased: 'r' and 'R' would share one
    survey = make_survey(
        tmp_path / "s", n_tiles=1, bands=("r", "R"), tile_size=120, n_sources=12,
        size_range_pixels=(8, 16),
        off_tile_fraction=0.0, edge_fraction=0.0, seed=4,
    )
    args = ["run", survey.catalogue_path, "--size", "8", "--no-progress"]
    fits_out = tmp_path / "fits"
    assert main([*args, "-o", str(fits_out), "--format", "fits"]) == 2
    err = capsys.readouterr().err
    assert "bands 'r' and 'R' would both be the FITS extension 'R'" in err
    assert not fits_out.exists() or not any(fits_out.glob("*.fits"))
    # Zarr keeps them apart, and so does FITS with one of them
    assert main([*args, "-o", str(tmp_path / "zarr")]) == 0
    assert list(cutana.open(tmp_path / "zarr").bands) == ["r", "R"]
    assert main([*args, "-o", str(fits_out), "--format", "fits", "--bands", "R"]) == 0


def test_zero_percentile_and_contrast_are_accepted_as_in_python(tmp_path, capsys):
    # 0 is valid for both (astropy's PercentileInterval and ZScaleInterval)
    survey = make_survey(
        tmp_path / "s", n_tiles=1, bands=("VIS",), tile_size=120, n_sources=10,
        size_range_pixels=(8, 16), seed=6,
    )
    base = ["run", survey.catalogue_path, "--size", "9", "--no-progress",
            "--dtype", "uint8"]
    for flags, kwargs in (
        (["--normalize", "linear", "--percentile", "0"], {"percentile": 0}),
        (["--normalize", "zscale", "--zscale-contrast", "0"], {"zscale_contrast": 0}),
    ):
        cli_out = tmp_path / f"cli{len(kwargs)}{flags[1]}"
        assert main([*base, "-o", str(cli_out), *flags]) == 0
        api_out = tmp_path / f"api{flags[1]}"
        cutana.make_cutouts(
            survey.catalogue_path, api_out, size=9, dtype="uint8",
            normalize=flags[1], progress=False, **kwargs,
        )
        np.testing.assert_array_equal(
            cutana.open(cli_out).images, cutana.open(api_out).images
        )
    capsys.readouterr()
    out = tmp_path / "bad"
    assert main([*base, "-o", str(out), "--normalize", "linear",
                 "--percentile", "101"]) == 2
    assert "percentile" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "plan", "verify"])
def test_interrupt_before_the_command_starts(tmp_path, capsys, monkeypatch, command):
    """Test that a Ctrl-C while the command is still being set up (building
    its parser, importing modules) ends it with 130 and one line, not a
    traceback."""
    import cutana.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main([command, "x.csv", "-o", str(tmp_path / "o")]) == 130
    assert capsys.readouterr().err == "cutana: interrupted\n"


@pytest.mark.parametrize("stop", ["_Terminated", "KeyboardInterrupt"])
def test_a_stop_that_python_wraps_while_importing_stops_the_command(
    tmp_path, capsys, monkeypatch, stop
):
    """Test that a stop raised while a class body is made during an import
    (Python 3.11 wraps it in a `RuntimeError` "Error calling __set_name__",
    as a SIGTERM in astropy's import once did: exit 1 and a traceback) ends
    the command as the stop does, and that an error unrelated to a stop
    is still raised."""
    import cutana.cli as cli

    exc_type = getattr(cli, stop) if stop == "_Terminated" else KeyboardInterrupt

    class Attribute:
        def __set_name__(self, owner, name):
            raise exc_type

    def importing():
        class Frame:  # noqa: F841 - made for its __set_name__ call
            obstime = Attribute()

    monkeypatch.setattr(cli, "build_parser", importing)
    code = cli.EXIT_TERMINATED if stop == "_Terminated" else cli.EXIT_INTERRUPTED
    assert main(["run", "x.csv", "-o", str(tmp_path / "o")]) == code
    err = capsys.readouterr().err
    said = "cutana: terminated" if code == 143 else "cutana: interrupted"
    assert err.startswith(said)
    assert "Traceback" not in err

    def failing():
        msg = "not a stop"
        raise RuntimeError(msg)

    monkeypatch.setattr(cli, "build_parser", failing)
    with pytest.raises(RuntimeError, match="not a stop"):
        main(["run", "x.csv", "-o", str(tmp_path / "o")])


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"]
)
def test_a_second_stop_signal_hurries_the_stop_instead_of_breaking_it_off(
    monkeypatch, signum
):
    """Test that the first SIGTERM (Ctrl-C) raises its stop, and that a
    second one raises nothing but asks the clean-up to hurry and leaves a
    third to end the process: raised in the first one's clean-up, it broke
    that off (workers and semaphores left behind, or a traceback)."""
    import cutana.cli as cli
    from cutana import _stop

    monkeypatch.setattr(_stop, "_REQUESTED", [])
    handlers = []
    monkeypatch.setattr(cli.signal, "signal", lambda s, h: handlers.append((s, h)))
    stop = cli._Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    with pytest.raises(stop):
        cli._on_stop_signal(signum, None)
    assert not _stop.hurried()
    assert handlers == []  # (the first SIGTERM no longer sets SIG_DFL)
    assert cli._on_stop_signal(signum, None) is None
    assert _stop.hurried()
    assert handlers == [(signum, signal.SIG_DFL)]


def test_a_stopped_command_frees_the_frames_of_the_whole_stop():
    """Test that `_stopped` clears the tracebacks of the stop and of the
    exceptions it was raised while handling, whose frames hold the stopped
    pool (and its queues' semaphores) until the process ends."""
    import cutana.cli as cli

    def raise_chain():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise cli._Terminated from None

    with pytest.raises(cli._Terminated) as info:
        raise_chain()
    exc = info.value
    first = exc.__context__
    assert exc.__traceback__ is not None and first.__traceback__ is not None
    assert cli._stopped(None, exc) == cli.EXIT_TERMINATED
    assert exc.__traceback__ is None and first.__traceback__ is None


def test_catalogue_and_output_from_the_config_file(survey, tmp_path, capsys):
    """Test that the config file may give the catalogue and the output (the
    command line wins), and that a run given neither is a usage error."""
    out = tmp_path / "o.zarr"
    cfg = tmp_path / "run.toml"
    cat = survey.catalogue_path
    cfg.write_text(f"catalogue = '{cat}'\noutput = '{out}'\nsize = 9\n")
    assert main(["run", "--config", str(cfg), "--no-progress"]) == 0
    assert cutana.open(out).images.shape[0] == survey.n_sources
    assert main(["plan", "--config", str(cfg)]) == 0
    other = tmp_path / "other.zarr"
    assert main(["run", "--config", str(cfg), "-o", str(other), "--no-progress"]) == 0
    assert other.exists()
    capsys.readouterr()
    assert main(["run", "--size", "9"]) == 2
    assert "the catalogue is required" in capsys.readouterr().err
    assert main(["run", survey.catalogue_path, "--size", "9"]) == 2
    assert "the output is required" in capsys.readouterr().err


def test_a_stop_lost_while_importing_is_raised_again(monkeypatch):
    """Test that a stop signal whose exception got lost while a module was
    compiled is raised again once the pipeline is imported."""
    import cutana.cli as cli
    from cutana import _stop

    monkeypatch.setattr(_stop, "_REQUESTED", [cli._Terminated])
    with pytest.raises(cli._Terminated):
        cli._import_pipeline()
    monkeypatch.setattr(_stop, "_REQUESTED", [KeyboardInterrupt])
    with pytest.raises(KeyboardInterrupt):
        cli._import_pipeline()
    monkeypatch.setattr(_stop, "_REQUESTED", [])
    assert cli._import_pipeline().make_cutouts is cutana.make_cutouts


@pytest.mark.parametrize("workers", [1, 2])
def test_a_stop_lost_during_the_run_stops_it_between_tasks(
    survey, tmp_path, monkeypatch, capsys, workers
):
    """Test that a SIGTERM whose exception got lost mid-run (Python drops
    one raised while a finaliser runs) stops the run at the next task, with
    exit 143 and an output that --resume finishes: it had run to the end
    with exit 0."""
    import cutana.cli as cli
    from cutana import _stop, pipeline

    monkeypatch.setattr(_stop, "_REQUESTED", [])
    calls = {"n": 0}
    original = pipeline._Runner._on_done

    def lose_a_stop(self, task, result):
        calls["n"] += 1
        if calls["n"] == 2:
            _stop.request(cli._Terminated)  # the handler ran, its raise was lost
        return original(self, task, result)

    monkeypatch.setattr(pipeline._Runner, "_on_done", lose_a_stop)
    out = tmp_path / "o.zarr"
    args = ["run", survey.catalogue_path, "-o", str(out), "--size", "11",
            "--max-sources-per-job", "4", "--workers", str(workers), "--no-progress"]
    assert main(args) == cli.EXIT_TERMINATED
    assert "terminated (SIGTERM)" in capsys.readouterr().err
    assert calls["n"] < 6  # stopped within the tasks in flight, not at the end
    monkeypatch.setattr(_stop, "_REQUESTED", [])
    monkeypatch.setattr(pipeline._Runner, "_on_done", original)
    assert main([*args, "--resume"]) == 0
    clean = tmp_path / "clean.zarr"
    assert main([*args[:3], str(clean), *args[4:]]) == 0
    got, ref = cutana.open(out), cutana.open(clean)
    np.testing.assert_array_equal(got.images[:], ref.images[:])
    np.testing.assert_array_equal(got.status[:], ref.status[:])


@pytest.mark.parametrize(("limit", "room"), [(None, True), ("4GB", True),
                                             ("4GB", False)])
def test_the_worker_server_starts_before_the_catalogue_is_read_where_it_fits(
    survey, tmp_path, monkeypatch, limit, room
):
    """Test that ``cutana run`` with worker processes starts their server
    first thing (it imports while the catalogue is read) without a memory
    limit, or with one that holds it beside reading the catalogue as
    estimated from the file's size; else only once the plan holds workers:
    a 2,000,000-row catalogue at 600MB peaked at 629 MB while it was read,
    beside the server."""
    from cutana import cli, executor, pipeline
    from cutana.planner import SERVER_BYTES

    size = os.path.getsize(survey.catalogue_path)
    need = SERVER_BYTES + cli._READ_BASE_BYTES + cli._READ_BYTES_PER_FILE_BYTE * size
    assert cli._server_fits_while_reading(None, survey.catalogue_path)
    assert cli._server_fits_while_reading(int(need) + 1, survey.catalogue_path)
    assert not cli._server_fits_while_reading(int(need) - 1, survey.catalogue_path)
    if not room:
        monkeypatch.setattr(cli, "_READ_BASE_BYTES", 10**13)

    events = []
    real_start, real_read = executor.start_forkserver, pipeline.read_catalog

    def start(preload=()):
        events.append("server")
        return real_start(preload)

    def read(*args, **kwargs):
        events.append("read")
        return real_read(*args, **kwargs)

    monkeypatch.setattr(executor, "start_forkserver", start)
    monkeypatch.setattr(pipeline, "read_catalog", read)
    args = ["run", survey.catalogue_path, "--output", str(tmp_path / "o.zarr"),
            "--size", "15", "--no-progress", "--workers", "2",
            "--backend", "processes"]
    assert main(args + (["--memory-limit", limit] if limit else [])) == 0
    assert "server" in events
    assert events[0] == ("server" if room else "read")
