# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""A catalogue fuzzer: hostile CSV catalogues through the ``cutana`` command.

Every generated catalogue must get either a clear error (exit code 2, one
``cutana: error:`` line naming the catalogue file, no traceback) or a
correct output (exit code 0, one output row per catalogue row, each bad row
``BAD_ROW`` with a message naming its row and column, each valid row with
the status and pixels astropy gives) -- never a traceback or a lost row.

The generator knows, cell by cell, whether a value is valid or invalid, so
the expected status of every row is computed independently, with
`astropy.nddata.overlap_slices` for the overlap of valid rows.
"""

import contextlib
import csv
import io
import json
import os
import re
import tempfile

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import Cutout2D, NoOverlapError, PartialOverlapError, overlap_slices
from astropy.wcs import WCS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cutana
from cutana.bench.synthetic import make_survey
from cutana.cli import main
from cutana.status import Status

TILE = 120
SCALE_ARCSEC = 0.1
MODES = {
    # name: (options, the size column is used, output format)
    "size_flag": (["--size", "9"], False, "zarr"),
    "resampled": (["--target-size", "8", "--resample", "bilinear"], True, "zarr"),
    "fits": ([], True, "fits"),
}


@pytest.fixture(scope="module")
def tile(tmp_path_factory):
    """One 120 x 120 tile in one band; its path, WCS and pixels."""
    survey = make_survey(
        tmp_path_factory.mktemp("tile"),
        n_tiles=1,
        bands=("VIS",),
        tile_size=TILE,
        n_sources=3,
        size_range_pixels=(8, 12),
        edge_fraction=0.0,
        off_tile_fraction=0.0,
        seed=9,
        cutana_style=False,
    )
    path = survey.paths[0]
    with fits.open(path) as hdul:
        data = np.array(hdul[0].data, dtype=np.float64)
        wcs = WCS(hdul[0].header)
    return path, wcs, data


# ----------------------------------------------------------------------------
# cells: (text written to the CSV, kind) with kind 'ok', 'bad' or '?'
# ----------------------------------------------------------------------------

BAD_COORD = ["nan", "NaN", "inf", "-inf", "", "abc", "1e400", "--", "1.2.3", "1,5"]
BAD_RA = [*BAD_COORD, "400", "-361", "1e30"]
BAD_DEC = [*BAD_COORD, "95", "-90.5", "1e30", "91"]
BAD_PIXEL = ["0", "-3", "0.2", "nan", "", "inf", "-inf", "1e6", "1e300", "big", "2e5"]
BAD_ARCSEC = ["0", "-1", "4e4", "nan", "", "inf", "x"]
ID_CHARS = st.sampled_from(
    list("abcXYZ019_-.,;:'\"/\\ ~*?<>|$`%")
    + ["..", "../", "é", "日", "\u202e", "\t", "\n", "\x00", "𝔘"]
)


def _number(value):
    return repr(float(value))


@st.composite
def coordinate(draw, lo, hi):
    """A pixel coordinate at least 0.1 pixel from a whole or half pixel.

    Boxes start at ``ceil(position - size / 2)``: at a whole or half pixel a
    world -> pixel round trip may land on either side of the boundary.
    """
    whole = draw(st.integers(lo, hi))
    frac = draw(st.sampled_from([0.13, 0.31, 0.37, 0.62, 0.71, 0.88]))
    return whole + frac


@st.composite
def positions(draw, lo=-25, hi=TILE + 25):
    """A pixel position on, across the edge of, or off the tile."""
    return draw(coordinate(lo, hi)), draw(coordinate(lo, hi))


@st.composite
def ids(draw, numeric):
    """A valid id: hostile text, or an integer."""
    if numeric:
        return str(draw(st.integers(-(10**12), 10**12)))
    text = "".join(draw(st.lists(ID_CHARS, min_size=1, max_size=12)))
    # astropy's ASCII readers strip blanks at the ends of fields and of the
    # lines of a quoted multi-line field, and numpy drops trailing NULs
    text = re.sub(r"[ \t\n]*\n[ \t\n]*", "\n", text).strip(" \t\n\x00")
    try:
        float(text)
        numeric_looking = True
    except ValueError:
        numeric_looking = text.lower() in (
            "",
            "nan",
            "inf",
            "none",
            "null",
            "n/a",
            "na",
        )
    if numeric_looking:
        text = f"s{text}"
    return text


@st.composite
def catalogues(draw):
    """A hostile CSV catalogue: bytes, per-row expectations, mode."""
    kind = draw(
        st.sampled_from(["table"] * 12 + ["empty", "blank", "garbage", "extra_field"])
    )
    if kind == "empty":
        return {"kind": kind, "data": b"", "mode": "size_flag"}
    if kind == "blank":
        return {"kind": kind, "data": b"  \n\n \n", "mode": "size_flag"}
    if kind == "garbage":
        raw = draw(st.binary(min_size=1, max_size=300))
        return {"kind": kind, "data": b"\xff\xfe" + raw, "mode": "size_flag"}
    extra_line = kind == "extra_field"  # a last line of more fields than the header
    kind = "table"
    mode = draw(st.sampled_from(sorted(MODES)))
    _, use_size_col, _ = MODES[mode]
    id_name = draw(st.sampled_from(["SourceID", "source_id", "ID", "object_id", None]))
    ra_name = draw(st.sampled_from(["RA"] * 6 + ["ra", "RAJ2000", "ra_deg", "R.A."]))
    dec_name = draw(st.sampled_from(["Dec"] * 6 + ["DEC", "dec", "DEJ2000", "decl"]))
    size_name = draw(
        st.sampled_from(["diameter_pixel"] * 3 + ["diameter_arcsec", "size", None])
    )
    extras = draw(
        st.lists(
            st.sampled_from(["extra", "名前", "a,b", "comment x", 'q"uote', "n"]),
            max_size=2,
            unique=True,
        )
    )
    numeric_ids = draw(st.booleans()) if id_name else False
    n_rows = draw(st.integers(1, 14))
    anchor = draw(st.integers(0, n_rows - 1))
    rows = []
    seen = []
    for i in range(n_rows):
        cells = {}
        expect = {}
        x, y = draw(positions())
        if i == anchor:  # one valid row well inside, so that there is work
            x, y = draw(positions(30, 90))
        ra_kind = (
            "ok" if i == anchor else draw(st.sampled_from(["ok"] * 4 + ["bad", "wrap"]))
        )
        dec_kind = "ok" if i == anchor else draw(st.sampled_from(["ok"] * 5 + ["bad"]))
        cells["x"], cells["y"] = x, y
        cells["ra"] = ra_kind
        cells["dec"] = dec_kind
        cells["ra_text"] = draw(st.sampled_from(BAD_RA)) if ra_kind == "bad" else None
        cells["dec_text"] = (
            draw(st.sampled_from(BAD_DEC)) if dec_kind == "bad" else None
        )
        cells["wrap"] = -360.0  # RA in [-360, 360] is taken modulo 360
        size_kind = "ok" if i == anchor else draw(st.sampled_from(["ok"] * 4 + ["bad"]))
        if size_name == "diameter_arcsec":
            k = draw(st.integers(3, 30))
            cells["size_px"] = k
            cells["size_text"] = (
                _number((k + 0.2) * SCALE_ARCSEC)
                if size_kind == "ok"
                else draw(st.sampled_from(BAD_ARCSEC))
            )
        else:
            k = draw(st.integers(3, 30))
            cells["size_px"] = k
            cells["size_text"] = (
                draw(st.sampled_from([str(k), f"{k}.0", f" {k} "]))
                if size_kind == "ok"
                else draw(st.sampled_from(BAD_PIXEL))
            )
        cells["size"] = size_kind
        if id_name:
            id_kind = (
                "ok"
                if i == anchor
                else draw(st.sampled_from(["ok"] * 6 + ["empty", "dup"]))
            )
            if id_kind == "empty":
                text = draw(st.sampled_from(["", " ", "  "]))
            elif id_kind == "dup" and seen:
                text = draw(st.sampled_from(seen))
            else:
                id_kind = "ok"
                text = draw(ids(numeric_ids))
            if id_kind == "ok" and text in seen:
                if i == anchor:
                    text = f"{text}#{i}"
                else:
                    id_kind = "dup"
            if id_kind != "empty" and text not in seen:
                seen.append(text)
            cells["id_text"] = text
            cells["id"] = id_kind
        cells["extras"] = [
            draw(st.sampled_from(["1", "x", "", "a,b", '"q"', "é"])) for _ in extras
        ]
        expect = {
            "ra": ra_kind,
            "dec": dec_kind,
            "size": size_kind,
            "id": cells.get("id", "ok"),
        }
        rows.append((cells, expect))
    return {
        "kind": kind,
        "mode": mode,
        "id_name": id_name,
        "ra_name": ra_name,
        "dec_name": dec_name,
        "size_name": size_name,
        "extras": extras,
        "rows": rows,
        "use_size_col": use_size_col,
        "extra_line": extra_line,
    }


def _render(spec, wcs):
    """Write the catalogue as CSV bytes; fill in the world coordinates."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = []
    if spec["id_name"]:
        header.append(spec["id_name"])
    header += [spec["ra_name"], spec["dec_name"]]
    if spec["size_name"]:
        header.append(spec["size_name"])
    header += spec["extras"]
    writer.writerow(header)
    for cells, _ in spec["rows"]:
        ra, dec = (float(v) for v in wcs.pixel_to_world_values(cells["x"], cells["y"]))
        cells["ra_deg"], cells["dec_deg"] = ra, dec
        line = []
        if spec["id_name"]:
            line.append(cells["id_text"])
        if cells["ra"] == "bad":
            line.append(cells["ra_text"])
        elif cells["ra"] == "wrap":
            line.append(_number(ra + cells["wrap"]))
        else:
            line.append(_number(ra))
        line.append(cells["dec_text"] if cells["dec"] == "bad" else _number(dec))
        if spec["size_name"]:
            line.append(cells["size_text"])
        line += cells["extras"]
        writer.writerow(line)
    data = out.getvalue().encode("utf-8")
    if spec["extra_line"]:
        data += b"z,1,2,3,4,5,6,7,8,9\n"  # more fields than the header names
    return data


# ----------------------------------------------------------------------------
# the oracle
# ----------------------------------------------------------------------------


def _file_error_expected(spec):
    """Whether the catalogue as a whole must be refused (exit code 2)."""
    if spec["kind"] != "table":
        return True
    if spec["ra_name"] == "R.A." or spec["dec_name"] == "decl":
        return True
    return spec["use_size_col"] and spec["size_name"] in (None, "size")


def _expected_status(spec, cells, expect, shape):
    """('bad', columns) or ('ok', status) for one row."""
    bad_columns = []
    if expect["ra"] == "bad":
        bad_columns.append(spec["ra_name"])
    if expect["dec"] == "bad":
        bad_columns.append(spec["dec_name"])
    if spec["use_size_col"] and expect["size"] == "bad":
        bad_columns.append(spec["size_name"])
    if expect["id"] != "ok":
        bad_columns.append(spec["id_name"])
    if bad_columns:
        return "bad", bad_columns
    n = cells["size_px"] if spec["use_size_col"] else 9
    try:
        overlap_slices(shape, (n, n), (cells["y"], cells["x"]), mode="strict")
    except PartialOverlapError:
        return "ok", Status.PARTIAL_OVERLAP
    except NoOverlapError:
        return "ok", Status.NO_OVERLAP
    return "ok", Status.OK


# ----------------------------------------------------------------------------
# the property
# ----------------------------------------------------------------------------


@settings(
    derandomize=True,
    max_examples=int(os.environ.get("FUZZ_N", 40)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(spec=catalogues())
def test_hostile_catalogue_clear_error_or_correct_output(tile, spec):
    """Test that any catalogue gives a clear error or a correct output, no traceback."""
    tile_path, wcs, data = tile
    raw = spec["data"] if spec["kind"] != "table" else _render(spec, wcs)
    with tempfile.TemporaryDirectory() as tmp:
        cat = os.path.join(tmp, "hostile cat.csv")
        with open(cat, "wb") as fh:
            fh.write(raw)
        out = os.path.join(tmp, "out")
        report = os.path.join(tmp, "report.json")
        options, _, fmt = MODES[spec["mode"]]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(
                [
                    "run",
                    cat,
                    "--tiles",
                    tile_path,
                    "-o",
                    out,
                    "--format",
                    fmt,
                    "--no-progress",
                    "--report-json",
                    report,
                    *options,
                ]
            )
        err = err.getvalue()
        assert "Traceback" not in err
        if _file_error_expected(spec):
            assert code == 2, err
            lines = [
                line for line in err.splitlines() if line.startswith("cutana: error")
            ]
            assert len(lines) == 1, err
            assert "hostile cat.csv" in lines[0]
            return
        assert code == 0, err
        _check_output(spec, out, report, fmt, data, wcs)


def _check_output(spec, out, report, fmt, data, wcs):
    archive = cutana.open(out)
    status = np.asarray(archive.status)
    rows = spec["rows"]
    assert len(status) == len(rows) + spec["extra_line"], "a row was lost or added"
    assert not (status == Status.PENDING).any()
    with open(report) as fh:
        messages = json.load(fh)["messages"]
    if spec["extra_line"]:  # the last line, of more fields than the header
        assert status[-1] == Status.BAD_ROW
        text = messages[str(len(rows))]
        assert f"row {len(rows)} has 10 fields where the header names" in text, text
    checked = 0
    for i, (cells, expect) in enumerate(rows):
        verdict, value = _expected_status(spec, cells, expect, data.shape)
        if verdict == "bad":
            assert status[i] == Status.BAD_ROW, (i, cells, expect)
            text = messages[str(i)]
            assert f"row {i} " in text, text
            assert any(repr(col) in text for col in value), (text, value)
            assert "\n" not in text
            continue
        assert status[i] == value, (i, cells, status[i], value)
        if spec["id_name"]:
            assert str(archive.source_id[i]) == cells["id_text"]
        if value == Status.OK and spec["mode"] != "resampled" and checked < 2:
            n = cells["size_px"] if spec["use_size_col"] else 9
            ref = Cutout2D(
                data, (cells["x"], cells["y"]), n, mode="partial", fill_value=np.nan
            )
            np.testing.assert_array_equal(
                np.asarray(archive[i])[0], ref.data.astype(np.float32)
            )
            checked += 1


# ----------------------------------------------------------------------------
# catalogues with nothing to cut
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "SourceID,RA,Dec,diameter_pixel\n",
        "SourceID,RA,Dec,diameter_pixel\na,nan,2,10\nb,150,95,10\nc,150,2,-1\n",
    ],
    ids=["header_only", "all_rows_bad"],
)
def test_catalogue_with_nothing_to_cut(tile, tmp_path, text):
    """Test that a catalogue without a single valid row still gives a full output."""
    cat = tmp_path / "c.csv"
    cat.write_text(text)
    out = tmp_path / "out"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(
            ["run", str(cat), "--tiles", tile[0], "-o", str(out), "--no-progress"]
        )
    assert code in (0, 2), err.getvalue()
    assert "Traceback" not in err.getvalue()
    if code == 0:
        n = text.count("\n") - 1
        status = np.asarray(cutana.open(out).status)
        assert len(status) == n and np.all(status == Status.BAD_ROW)
