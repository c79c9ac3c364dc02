# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of cutana.catalog: formats, aliases, validation, file lists."""

import ast
import collections
import io
import os
import tempfile

import numpy as np
import pytest
from astropy.table import MaskedColumn, Table
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.testing import assert_array_equal

from cutana.catalog import MAX_SIZE_ARCSEC, MAX_SIZE_PIXEL, Catalog, read_catalog
from cutana.exceptions import CatalogError, ConfigError
from cutana.status import Status

BAD = Status.BAD_ROW
OK = Status.OK


def _reference_table(n=12, seed=0):
    """A small valid catalogue with string ids and absolute file lists."""
    rng = np.random.default_rng(seed)
    files = [
        str([f"/data/t{i % 3}/VIS.fits", f"/data/t{i % 3}/NIR_H.fits"])
        for i in range(n)
    ]
    return Table(
        {
            "SourceID": [f"src-{i:03d}" for i in range(n)],
            "RA": rng.uniform(0, 360, n),
            "Dec": rng.uniform(-89, 89, n),
            "diameter_pixel": rng.uniform(5, 200, n),
            "fits_file_paths": files,
        }
    )


def _write(table, path):
    """Write ``table`` in the format implied by the file name."""
    name = os.fspath(path)
    if name.endswith(".csv"):
        table.write(name, format="ascii.csv")
    elif name.endswith(".ecsv"):
        table.write(name, format="ascii.ecsv")
    elif name.endswith((".fits", ".fit")):
        table.write(name, format="fits")
    elif name.endswith((".parquet", ".pq")):
        table.write(name, format="parquet")
    elif name.endswith((".vot", ".xml")):
        table.write(name, format="votable")
    return name


@pytest.mark.parametrize(
    "kind",
    ["csv", "ecsv", "fits", "fit", "parquet", "pq", "vot", "xml", "Table", "DataFrame"],
)
def test_formats_read_the_same(tmp_path, kind):
    """Test that every input format gives the same catalogue as the reference."""
    ref = _reference_table()
    if kind == "Table":
        source = ref
    elif kind == "DataFrame":
        source = ref.to_pandas()
    else:
        source = _write(ref, tmp_path / f"cat.{kind}")
    cat = read_catalog(source)
    assert isinstance(cat, Catalog)
    assert len(cat) == len(ref)
    assert cat.source_id.dtype.kind == "U"
    assert_array_equal(cat.source_id, np.asarray(ref["SourceID"], dtype=str))
    assert_array_equal(cat.ra, np.asarray(ref["RA"]))
    assert_array_equal(cat.dec, np.asarray(ref["Dec"]))
    assert_array_equal(cat.size_pixel, np.asarray(ref["diameter_pixel"]))
    assert np.isnan(cat.size_arcsec).all()
    assert cat.status.dtype == np.int16
    assert_array_equal(cat.status, np.zeros(len(ref)))
    assert cat.messages == {}
    expected = [
        (f"/data/t{i % 3}/VIS.fits", f"/data/t{i % 3}/NIR_H.fits")
        for i in range(len(ref))
    ]
    assert cat.fits_file_paths == expected
    if kind in ("Table", "DataFrame"):
        assert cat.source == f"<{kind}>"
    else:
        assert cat.source == source


@pytest.mark.parametrize("kind", ["ecsv", "fits", "parquet"])
def test_masks_and_units_written_by_astropy(tmp_path, kind):
    """Test that masked cells and angle units of a table file written by
    astropy are read as astropy reads the file back (Parquet keeps them in
    extra columns and in its metadata)."""
    t = Table()
    t["SourceID"] = MaskedColumn(["a", "b", "c", "d"], mask=[0, 0, 1, 0])
    ra = np.deg2rad([150.0, 150.1, 150.2, 150.3])
    t["RA"] = MaskedColumn(ra, mask=[0, 1, 0, 0], unit="rad")
    t["Dec"] = MaskedColumn(np.deg2rad([1.0, 1.1, 1.2, 1.3]), unit="rad")
    t["diameter_pixel"] = MaskedColumn([16, 16, 16, 16], mask=[0, 0, 0, 1])
    path = _write(t, tmp_path / f"cat.{kind}")
    back = Table.read(path)
    assert back["RA"].unit == "rad"
    assert list(np.ma.getmaskarray(back["RA"])) == [False, True, False, False]
    cat = read_catalog(path)
    assert_array_equal(cat.status, [0, 3, 3, 3])
    assert cat.source_id[0] == "a"
    np.testing.assert_allclose(cat.ra[[0, 2, 3]], [150.0, 150.2, 150.3], rtol=1e-14)
    np.testing.assert_allclose(cat.dec, [1.0, 1.1, 1.2, 1.3], rtol=1e-14)
    assert "'RA'" in cat.messages[1]
    assert "'SourceID'" in cat.messages[2]
    assert "'diameter_pixel'" in cat.messages[3]


@pytest.mark.parametrize("files", [True, False])
def test_csv_lines_as_astropy_reads_them(tmp_path, files):
    """Test CSV details as astropy's reader has them, with and without a
    file-list column: a quoted first field starting with '#' is data, not a
    comment; a byte-order mark may precede a first comment line; a quoted
    field may follow blanks after its comma."""
    tail = ',"/d/x.fits"' if files else ""
    head = ",fits_file_paths" if files else ""
    texts = {
        "hash.csv": (
            f"# made by hand\nSourceID,RA,Dec,diameter_pixel{head}\n"
            f"A,150.0,2.0,16{tail}\n\"#B\",150.1,2.0,16{tail}\n"
            f"C,150.2,2.0,16{tail}\n"
        ),
        "bom.csv": (
            f"\ufeff# made by hand\nSourceID,RA,Dec,diameter_pixel{head}\n"
            f"A,150.0,2.0,16{tail}\n"
        ),
        "blanks.csv": (
            f"SourceID, RA, Dec, diameter_pixel{head.replace(',', ', ')}\n"
            + (", \"['/d/0.fits']\"" if files else "").join(("0, 150.0, 2.0, 16", "\n"))
            + (", \"['/d/1.fits', '/d/y.fits']\"" if files else "").join(
                ("1, 150.1, 2.0, 16", "\n")
            )
        ),
    }
    for name, text in texts.items():
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        comment = r"\ufeff?\s*#" if name != "blanks.csv" else None
        ref = Table.read(path, format="ascii.csv", comment=comment)
        cat = read_catalog(path)
        assert_array_equal(cat.source_id, np.asarray(ref["SourceID"], dtype=str))
        assert_array_equal(cat.ra, np.asarray(ref["RA"], dtype=float))
        assert_array_equal(cat.status, 0)
        if files:
            expect = [
                tuple(ast.literal_eval(v)) if v.startswith("[") else (v,)
                for v in map(str, ref["fits_file_paths"])
            ]
            assert cat.fits_file_paths == expect


def test_overlong_file_list_is_named(tmp_path):
    """Test that a file-list cell too long to be parsed says so."""
    paths = [f"/data/tile_{i:06d}/{'x' * 90}.fits" for i in range(1000)]
    t = Table({"SourceID": ["a"], "RA": [1.0], "Dec": [1.0], "diameter_pixel": [16],
               "fits_file_paths": [str(paths)]})
    cat = read_catalog(_write(t, tmp_path / "cat.csv"))
    assert cat.status[0] == Status.BAD_ROW
    assert "longer than a file list may be (100,000)" in cat.messages[0]


@pytest.mark.parametrize(
    ("id_name", "ra_name", "dec_name"),
    [
        ("SourceID", "RA", "Dec"),
        ("source_id", "ra", "dec"),
        ("object_id", "ra_deg", "dec_deg"),
        ("OBJECTID", "RIGHT_ASCENSION", "DECLINATION"),
        ("ID", "Ra", "DEC"),
        ("id", "RAJ2000", "DEJ2000"),
    ],
)
def test_aliases(id_name, ra_name, dec_name):
    """Test that the column aliases are found in any case."""
    t = Table({id_name: ["a", "b"], ra_name: [10.0, 20.0], dec_name: [-5.0, 5.0]})
    cat = read_catalog(t, size=16)
    assert_array_equal(cat.source_id, ["a", "b"])
    assert_array_equal(cat.ra, [10.0, 20.0])
    assert_array_equal(cat.dec, [-5.0, 5.0])
    assert_array_equal(cat.size_pixel, [16.0, 16.0])
    assert cat.columns["id"] == id_name
    assert cat.columns["ra"] == ra_name
    assert cat.columns["dec"] == dec_name


def test_explicit_columns_override_aliases():
    """Test that id/ra/dec/size_column choose columns over the aliases."""
    t = Table(
        {
            "ra": [1.0, 2.0],
            "dec": [3.0, 4.0],
            "name": ["x", "y"],
            "alpha": [11.0, 12.0],
            "delta": [13.0, 14.0],
            "width_arcsec": [2.0, 3.0],
            "box": [30.0, 40.0],
            "diameter_pixel": [1.0, 1.0],
        }
    )
    cat = read_catalog(
        t,
        id_column="NAME",
        ra_column="alpha",
        dec_column="delta",
        size_column="width_arcsec",
    )
    assert_array_equal(cat.source_id, ["x", "y"])
    assert_array_equal(cat.ra, [11.0, 12.0])
    assert_array_equal(cat.dec, [13.0, 14.0])
    assert_array_equal(cat.size_arcsec, [2.0, 3.0])
    assert np.isnan(cat.size_pixel).all()
    cat = read_catalog(t, size_column="box")
    assert_array_equal(cat.size_pixel, [30.0, 40.0])
    assert np.isnan(cat.size_arcsec).all()


def test_size_option_overrides_size_columns():
    """Test that size= replaces the size columns, which are then not validated."""
    t = Table({"ra": [1.0, 2.0], "dec": [3.0, 4.0], "diameter_pixel": [-1.0, np.nan]})
    cat = read_catalog(t, size=32)
    assert_array_equal(cat.size_pixel, [32.0, 32.0])
    assert_array_equal(cat.status, [OK, OK])
    bad = read_catalog(t)
    assert_array_equal(bad.status, [BAD, BAD])


@pytest.mark.parametrize(
    "size", [0, -3, np.nan, np.inf, 0.4, MAX_SIZE_PIXEL + 1, "big", True]
)
def test_bad_size_option_raises(size):
    """Test that an invalid size= is a ConfigError naming the value."""
    t = Table({"ra": [1.0], "dec": [3.0]})
    with pytest.raises(ConfigError, match="size must be a positive number of pixels"):
        read_catalog(t, size=size)


def test_a_size_column_a_row_does_not_use_is_no_fault_of_the_row():
    """Test that a bad diameter_arcsec does not make a row bad whose
    diameter_pixel, which wins, is good; a bad diameter_pixel does, also
    beside a good diameter_arcsec. Before, the first row was a bad row for
    a value never used."""
    t = Table(
        {
            "ra": [1.0, 2.0, 3.0, 4.0],
            "dec": [0.0, 0.0, 0.0, 0.0],
            "diameter_pixel": [16.0, np.nan, -3.0, 12.0],
            "diameter_arcsec": [-1.0, 4.0, 2.0, np.inf],
        }
    )
    cat = read_catalog(t)
    assert_array_equal(cat.status, [OK, OK, BAD, OK])
    assert_array_equal(cat.size_pixel, [16.0, np.nan, np.nan, 12.0])
    assert cat.messages[2] == (
        "<Table> row 2 column 'diameter_pixel': value -3.0 is not a positive size"
    )


def test_the_first_good_row_of_an_id_is_cut():
    """Test that among rows sharing an id the first one that is good
    otherwise is cut and the later ones are bad rows, each naming it; a bad
    row before it (NaN RA) does not make it a duplicate too, as it did (no
    row of the id was cut). A bad row is still told the earlier row of its
    id."""
    t = Table(
        {
            "SourceID": ["a", "a", "b", "a", "b"],
            "ra": [np.nan, 150.0, 150.1, 150.2, 95.0],
            "dec": [2.0, 2.0, 2.0, 2.0, 91.0],
            "diameter_pixel": [10.0] * 5,
        }
    )
    cat = read_catalog(t)
    assert_array_equal(cat.status, [BAD, OK, OK, BAD, BAD])
    assert "duplicates" not in cat.messages[0]
    assert cat.messages[3] == (
        "<Table> row 3 column 'SourceID': value 'a' duplicates the id of row 1"
    )
    assert cat.messages[4].endswith(
        "column 'SourceID': value 'b' duplicates the id of row 2"
    )


@pytest.mark.parametrize(
    ("unit", "value", "ra_deg"),
    [("deg", 150.0, 150.0), ("hourangle", 10.0, 150.0), ("h", 10.0, 150.0),
     ("min", 600.0, 150.0), ("rad", 2.0, np.degrees(2.0))],
)
def test_coordinate_units(unit, value, ra_deg):
    """Test that RA in an angular unit, or in hours (a time unit, as hour
    angle), is read in degrees."""
    t = Table({"ra": [value], "dec": [2.0], "diameter_pixel": [10.0]})
    t["ra"].unit = unit
    cat = read_catalog(t)
    assert cat.status[0] == OK
    np.testing.assert_allclose(cat.ra, [ra_deg], rtol=1e-12)


@pytest.mark.parametrize(
    ("column", "unit"), [("ra", "m"), ("dec", "pix"), ("dec", "h")]
)
def test_a_coordinate_unit_that_is_not_an_angle_is_refused(column, unit):
    """Test that RA or Dec in metres, pixels (or Dec in hours) is refused,
    naming the column and unit: it was read as degrees without a word."""
    t = Table({"ra": [150.0], "dec": [2.0], "diameter_pixel": [10.0]})
    t[column].unit = unit
    match = f"column '{column}': its unit .* is not an angle"
    with pytest.raises(CatalogError, match=match):
        read_catalog(t)


def test_a_coordinate_unit_astropy_does_not_know_is_taken_as_degrees(caplog):
    """Test that an unknown unit string (``'degrees'``) is taken as degrees,
    with a warning naming it."""
    import logging

    t = Table({"ra": [150.0], "dec": [2.0], "diameter_pixel": [10.0]})
    t["ra"].unit = "degrees"
    with caplog.at_level(logging.WARNING, logger="cutana"):
        cat = read_catalog(t)
    assert cat.ra[0] == 150.0
    assert "does not know its unit 'degrees'" in caplog.text


def test_both_size_columns():
    """Test that rows may give their size in either unit, pixels first."""
    t = Table(
        {
            "ra": [1.0, 2.0, 3.0, 4.0],
            "dec": [0.0, 0.0, 0.0, 0.0],
            "diameter_pixel": MaskedColumn([10.0, np.nan, 0.0, 0.0], mask=[0, 0, 1, 1]),
            "diameter_arcsec": MaskedColumn([5.0, 3.0, 4.0, 0.0], mask=[0, 0, 0, 1]),
        }
    )
    cat = read_catalog(t)
    assert_array_equal(cat.status, [OK, OK, OK, BAD])
    assert_array_equal(cat.size_pixel, [10.0, np.nan, np.nan, np.nan])
    assert_array_equal(cat.size_arcsec, [5.0, 3.0, 4.0, np.nan])
    assert_array_equal(cat.diameter_pixels(0.1), [10.0, 30.0, 40.0, np.nan])
    assert "so the row has no size" in cat.messages[3]
    assert "'diameter_pixel': value is missing" in cat.messages[3]


# one bad value per case: (column, value, text expected in the message)
_BAD_CASES = {
    "ra_nan": ("RA", "nan", "value nan is not finite"),
    "ra_text": ("RA", "abc", "value 'abc' is not a number"),
    "ra_missing": ("RA", "", "value is missing"),
    "ra_range": ("RA", "400.5", "value 400.5 is outside [-360, 360]"),
    "dec_inf": ("Dec", "inf", "value inf is not finite"),
    "dec_range": ("Dec", "95.2", "value 95.2 is outside [-90, 90]"),
    "dec_range_low": ("Dec", "-90.5", "value -90.5 is outside [-90, 90]"),
    "size_zero": ("diameter_pixel", "0", "value 0.0 is not a positive size"),
    "size_negative": ("diameter_pixel", "-4", "value -4.0 is not a positive size"),
    "size_inf": ("diameter_pixel", "inf", "value inf is not finite"),
    "size_huge": ("diameter_pixel", "200000", "value 200000.0 exceeds 100000 pixels"),
    "size_tiny": ("diameter_pixel", "0.3", "value 0.3 rounds to 0 pixels"),
    "size_text": ("diameter_pixel", "big", "value 'big' is not a number"),
    "size_nan": ("diameter_pixel", "nan", "so the row has no size"),
    "size_missing": ("diameter_pixel", "", "value is missing, so the row has no size"),
    "id_empty": ("SourceID", "", "value is missing"),
    "id_blank": ("SourceID", '"  "', "value is missing"),
    "files_bad": (
        "fits_file_paths",
        '"[1, 2]"',
        "is not a file path or a list of file paths",
    ),
    "files_code": (
        "fits_file_paths",
        "\"[__import__('os').system('touch hacked')]\"",
        "is not a file path",
    ),
    "files_syntax": ("fits_file_paths", "\"['a.fits'\"", "is not a file path"),
    # numpy's print of an array: Python would join the two paths into one
    "files_no_comma": (
        "fits_file_paths",
        "\"['a.fits' 'b.fits']\"",
        "has no comma between its paths (as numpy prints an array)",
    ),
    "files_missing": ("fits_file_paths", "", "value is missing"),
}


@pytest.mark.parametrize("case", sorted(_BAD_CASES))
def test_bad_row_kinds(tmp_path, case):
    """Test that each kind of bad value marks only its row, with a full message."""
    column, value, expected = _BAD_CASES[case]
    header = ["SourceID", "RA", "Dec", "diameter_pixel", "fits_file_paths"]
    good = ["s{i}", "10.0", "20.0", "32", "/t/a.fits"]
    lines = [",".join(header)]
    bad_row = 3
    for i in range(6):
        row = [v.format(i=i) for v in good]
        if i == bad_row:
            row[header.index(column)] = value
        lines.append(",".join(row))
    path = tmp_path / "catalogue.csv"
    path.write_text("\n".join(lines) + "\n")
    cat = read_catalog(path)
    assert len(cat) == 6
    expected_status = np.full(6, OK)
    expected_status[bad_row] = BAD
    assert_array_equal(cat.status, expected_status)
    assert list(cat.messages) == [bad_row]
    msg = cat.messages[bad_row]
    assert msg.startswith(f"catalogue.csv row {bad_row} ")
    assert f"column {column!r}" in msg
    assert expected in msg
    if column in ("RA", "Dec"):
        assert np.isnan(getattr(cat, column.lower())[bad_row])
        others = np.delete(getattr(cat, column.lower()), bad_row)
        assert np.isfinite(others).all()
    if column == "diameter_pixel":
        assert np.isnan(cat.size_pixel[bad_row])
    if column == "fits_file_paths":
        assert cat.fits_file_paths[bad_row] == ()
        assert cat.fits_file_paths[0] == ("/t/a.fits",)


def test_size_arcsec_limit():
    """Test that diameters above MAX_SIZE_ARCSEC arcsec are bad rows."""
    t = Table(
        {"ra": [1.0, 2.0], "dec": [0.0, 0.0], "diameter_arcsec": [MAX_SIZE_ARCSEC, 4e4]}
    )
    cat = read_catalog(t)
    assert_array_equal(cat.status, [OK, BAD])
    assert "value 40000.0 exceeds 36000 arcsecs" in cat.messages[1]


def test_ra_wrapping():
    """Test that RA in [-360, 360] is wrapped into [0, 360) and beyond is bad."""
    ra = [-360.0, -10.0, -1e-20, 0.0, 359.5, 360.0, 361.0, -361.0]
    t = Table({"ra": ra, "dec": np.zeros(len(ra))})
    cat = read_catalog(t, size=8)
    assert_array_equal(cat.ra[:6], [0.0, 350.0, 0.0, 0.0, 359.5, 0.0])
    assert_array_equal(cat.status, [OK] * 6 + [BAD] * 2)
    assert np.isnan(cat.ra[6:]).all()
    assert (cat.ra[:6] >= 0).all() and (cat.ra[:6] < 360).all()
    assert "value 361.0 is outside [-360, 360]" in cat.messages[6]
    assert "value -361.0" in cat.messages[7]


def test_several_problems_in_one_row():
    """Test that all problems of a row are in its one message."""
    t = Table({"id": ["a", "a"], "ra": [1.0, np.nan], "dec": [0.0, 91.0]})
    cat = read_catalog(t, size=4)
    msg = cat.messages[1]
    assert msg.startswith("<Table> row 1 ")
    for part in (
        "column 'ra': value nan",
        "column 'dec': value 91.0",
        "duplicates the id of row 0",
    ):
        assert part in msg


def test_duplicate_ids_against_counter():
    """Test that all but the first occurrence of each id are bad rows."""
    rng = np.random.default_rng(3)
    ids = [str(v) for v in rng.integers(0, 300, 1000)]
    t = Table({"object_id": ids, "ra": np.ones(1000), "dec": np.ones(1000)})
    cat = read_catalog(t, size=10)
    seen = collections.Counter()
    first = {}
    for i, v in enumerate(ids):
        seen[v] += 1
        first.setdefault(v, i)
        if seen[v] == 1:
            assert cat.status[i] == OK
            assert i not in cat.messages
        else:
            assert cat.status[i] == BAD
            assert f"value {v!r} duplicates the id of row {first[v]}" in cat.messages[i]


def test_blank_ids_are_bad_rows():
    """Test that empty, blank and masked ids are bad rows."""
    t = Table({"id": MaskedColumn(["a", "", "  ", "b"], mask=[0, 0, 0, 1])})
    t["ra"] = np.ones(4)
    t["dec"] = np.ones(4)
    cat = read_catalog(t, size=4)
    assert_array_equal(cat.status, [OK, BAD, BAD, BAD])
    assert_array_equal(cat.source_id, ["a", "", "  ", ""])
    assert "column 'id': value is missing" in cat.messages[1]
    assert "column 'id': value '  ' is empty" in cat.messages[2]
    assert "column 'id': value is missing" in cat.messages[3]


def test_missing_id_column_gives_row_numbers():
    """Test that without an id column the ids are the 0-based row numbers."""
    t = Table({"ra": [1.0, 2.0, 3.0], "dec": [0.0, 0.0, 0.0]})
    cat = read_catalog(t, size=4)
    assert_array_equal(cat.source_id, ["0", "1", "2"])
    assert cat.columns["id"] is None


def test_ids_kept_as_written(tmp_path):
    """Test that CSV ids keep leading zeros and any characters."""
    path = tmp_path / "ids.csv"
    path.write_text("SourceID,RA,Dec\n007,1,2\n+5,1,2\n12,1,2\n-03,1,2\n")
    cat = read_catalog(path, size=4)
    assert_array_equal(cat.source_id, ["007", "+5", "12", "-03"])
    assert_array_equal(cat.status, [OK] * 4)
    path = tmp_path / "plain.csv"
    path.write_text("RA,Dec,id\n1,2,10\n1,2,-20\n")
    assert_array_equal(read_catalog(path, size=4).source_id, ["10", "-20"])
    hostile = ["a/b", "../../etc/passwd", "a_b", "x\\y", "é ü", "C:\\z"]
    t = Table({"id": hostile, "ra": np.ones(6), "dec": np.ones(6)})
    cat = read_catalog(t, size=4)
    assert_array_equal(cat.source_id, hostile)
    assert_array_equal(cat.status, [OK] * 6)


def test_numeric_ids_from_binary_formats(tmp_path):
    """Test that integer and integral float ids become their decimal text."""
    t = Table({"id": np.array([5, -7, 2**62]), "ra": np.ones(3), "dec": np.ones(3)})
    cat = read_catalog(_write(t, tmp_path / "ints.fits"), size=4)
    assert_array_equal(cat.source_id, ["5", "-7", str(2**62)])
    df = Table(
        {"id": [1.0, np.nan, 3.5], "ra": np.ones(3), "dec": np.ones(3)}
    ).to_pandas()
    cat = read_catalog(df, size=4)
    assert_array_equal(cat.source_id, ["1", "", "3.5"])
    assert_array_equal(cat.status, [OK, BAD, OK])


def test_text_column_becomes_per_row_bad_rows(tmp_path):
    """Test that text in a numeric column gives bad rows, not a crash."""
    path = tmp_path / "text.csv"
    path.write_text("ra,dec\n1.5,2\nN/A,2\n3,north\n 4.5 ,2\n")
    cat = read_catalog(path, size=4)
    assert_array_equal(cat.status, [OK, BAD, BAD, OK])
    assert_array_equal(cat.ra[[0, 3]], [1.5, 4.5])
    assert "column 'ra': value 'N/A' is not a number" in cat.messages[1]
    assert "column 'dec': value 'north' is not a number" in cat.messages[2]


def _sexagesimal_text(value, hours, form, rng):
    """``value`` (degrees) written sexagesimal in one of four forms."""
    sign = "-" if value < 0 else rng.choice(["", "+"])
    a = abs(value) / (15.0 if hours else 1.0)
    d = int(a)
    m = int((a - d) * 60)
    s = (a - d - m / 60) * 3600
    if form == 0:
        return f"{sign}{d:02d}:{m:02d}:{s:07.4f}"
    if form == 1:
        return f" {sign}{d} {m} {s:.3f} "
    if form == 2:
        return f"{sign}{d}:{m + s / 60:.6f}"
    unit = "hms" if hours else "dms"
    return f"{sign}{d}{unit[0]}{m}{unit[1]}{s:.3f}{unit[2]}"


def test_sexagesimal_coordinates_as_skycoord_reads_them(tmp_path):
    """Test that sexagesimal RA (hours) and Dec (degrees) in a CSV, in four
    written forms, give the degrees `SkyCoord` gives for the same text."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    rng = np.random.default_rng(7)
    n = 400
    ra = rng.uniform(0, 360, n)
    dec = rng.uniform(-90, 90, n)
    forms = rng.integers(0, 4, n)
    pairs = zip(ra, dec, forms, strict=True)
    ra_text, dec_text = zip(
        *[(_sexagesimal_text(r, True, f, rng), _sexagesimal_text(d, False, f, rng))
          for r, d, f in pairs],
        strict=True,
    )
    ra_text, dec_text = list(ra_text), list(dec_text)
    dec_text[:2] = ["-00:30:00", "+00 00 01.5"]  # signs of a zero first field
    dec[:2] = [-0.5, 1.5 / 3600]
    path = tmp_path / "sexagesimal.csv"
    Table({"id": np.arange(n), "ra": ra_text, "dec": dec_text}).write(path)
    cat = read_catalog(path, size=8)
    ref = SkyCoord(ra_text, dec_text, unit=(u.hourangle, u.deg))
    assert_array_equal(cat.status, [OK] * n)
    assert_array_equal(cat.ra, ref.ra.deg)
    assert_array_equal(cat.dec, ref.dec.deg)
    assert cat.dec[0] == -0.5
    # within the rounding of the written seconds
    np.testing.assert_allclose(cat.ra, ra, rtol=0, atol=1e-5)
    np.testing.assert_allclose(cat.dec, dec, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["ecsv", "fits"])
def test_sexagesimal_in_a_column_with_a_unit(tmp_path, kind):
    """Test that the column's own angular unit is the first field's unit,
    that numbers and sexagesimal text mix in one column, and that a FITS
    table's text (bytes) is read too."""
    t = Table({"ra": ["150:30:00", "10.5"], "dec": ["-02:30:00", "1"]})
    t["ra"].unit = "deg"
    cat = read_catalog(_write(t, tmp_path / f"units.{kind}"), size=4)
    assert_array_equal(cat.status, [OK, OK])
    assert_array_equal(cat.ra, [150.5, 10.5])
    assert_array_equal(cat.dec, [-2.5, 1.0])


def test_bad_sexagesimal_values_give_astropys_reason(tmp_path):
    """Test that text astropy cannot read as an angle is a bad row, with
    astropy's reason when it looks like an angle."""
    path = tmp_path / "bad.csv"
    path.write_text(
        "id,ra,dec\na,12:61:00,1\nb,150:00:00,1\nc,10:00:00,+91:00:00\n"
        "d,1:2:3:4,1\ne,north,1\n"
    )
    cat = read_catalog(path, size=4)
    assert_array_equal(cat.status, [BAD] * 5)
    assert "value '12:61:00' is not a number, nor an angle" in cat.messages[0]
    assert "'minute'" in cat.messages[0]
    assert "read in hours" in cat.messages[1]
    assert "column 'dec': value 91.0 is outside [-90, 90]" in cat.messages[2]
    assert "value '1:2:3:4' is not a number, nor an angle" in cat.messages[3]
    assert cat.messages[4].endswith("column 'ra': value 'north' is not a number")


@pytest.mark.parametrize("kind", ["ecsv", "fits", "parquet", "table"])
def test_skycoord_column(tmp_path, kind):
    """Test that a SkyCoord column (written by astropy to ECSV or FITS and
    read back as one, or in memory) gives the positions, in ICRS, when the
    table has no RA or Dec column."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord
    from astropy.table import QTable

    rng = np.random.default_rng(5)
    sky = SkyCoord(rng.uniform(0, 360, 20) * u.deg, rng.uniform(-90, 90, 20) * u.deg,
                   frame="galactic")
    t = QTable({"id": np.arange(20), "where": sky})
    if kind == "parquet":
        pytest.importorskip("pyarrow")
    src = t if kind == "table" else _write(t, tmp_path / f"sky.{kind}")
    cat = read_catalog(src, size=8)
    assert_array_equal(cat.status, [OK] * 20)
    np.testing.assert_allclose(cat.ra, sky.icrs.ra.deg, rtol=0, atol=1e-9)
    np.testing.assert_allclose(cat.dec, sky.icrs.dec.deg, rtol=0, atol=1e-9)
    assert (cat.columns["ra"], cat.columns["dec"]) == ("where.ra", "where.dec")


def test_skycoord_column_choice():
    """Test that RA and Dec columns win over a SkyCoord column, that
    ra_column picks one of several SkyCoord columns, and that several
    without a choice are refused, naming them."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord
    from astropy.table import QTable

    a = SkyCoord([10, 20] * u.deg, [1, 2] * u.deg)
    b = SkyCoord([30, 40] * u.deg, [-3, -4] * u.deg)
    t = QTable({"id": [1, 2], "ra": [5.0, 6.0], "dec": [7.0, 8.0], "a": a})
    assert_array_equal(read_catalog(t, size=4).ra, [5.0, 6.0])
    t = QTable({"id": [1, 2], "a": a, "b": b})
    cat = read_catalog(t, size=4, ra_column="b")
    np.testing.assert_allclose(cat.dec, [-3.0, -4.0], rtol=0, atol=1e-12)
    with pytest.raises(CatalogError, match="2 SkyCoord columns \\('a', 'b'\\)"):
        read_catalog(t, size=4)


def test_fits_file_paths_forms(tmp_path):
    """Test list literals, tuples, single paths and relative paths."""
    sub = tmp_path / "cats"
    sub.mkdir()
    path = sub / "cutana.csv"
    path.write_text(
        "SourceID,RA,Dec,diameter_pixel,fits_file_paths\n"
        "1,1,1,10,\"['/abs/VIS.fits', '/abs/NIR_H.fits']\"\n"
        "2,1,1,10,\"('rel/VIS.fits',)\"\n"
        "3,1,1,10,/abs/single.fits\n"
        "4,1,1,10,\"['../up.fits', 's3://bucket/x.fits']\"\n"
    )
    cat = read_catalog(path)
    assert_array_equal(cat.status, [OK] * 4)
    assert cat.fits_file_paths == [
        ("/abs/VIS.fits", "/abs/NIR_H.fits"),
        (os.path.join(str(sub), "rel", "VIS.fits"),),
        ("/abs/single.fits",),
        (os.path.join(str(tmp_path), "up.fits"), "s3://bucket/x.fits"),
    ]
    assert cat.columns["files"] == "fits_file_paths"
    ignored = read_catalog(path, files_column=False)
    assert ignored.fits_file_paths is None


def test_fits_file_paths_relative_to_the_working_directory(tmp_path, monkeypatch):
    """Test that a relative path naming a file only from the working
    directory (as ESA Cutana opens it) is taken from there, and one naming
    a file beside the catalogue from the catalogue's folder."""
    sub = tmp_path / "cats"
    (sub / "data").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    for folder in (tmp_path / "data", sub / "data"):
        (folder / "both.fits").write_bytes(b"")
    (tmp_path / "data" / "here.fits").write_bytes(b"")
    path = sub / "cutana.csv"
    path.write_text(
        "SourceID,RA,Dec,diameter_pixel,fits_file_paths\n"
        "1,1,1,10,\"['data/here.fits', 'data/both.fits']\"\n"
        "2,1,1,10,data/nowhere.fits\n"
    )
    monkeypatch.chdir(tmp_path)
    cat = read_catalog(path)
    assert cat.fits_file_paths == [
        (str(tmp_path / "data" / "here.fits"), str(sub / "data" / "both.fits")),
        (str(sub / "data" / "nowhere.fits"),),
    ]
    # from another working directory, the catalogue's folder as before
    monkeypatch.chdir(sub)
    assert read_catalog(path).fits_file_paths[0][0] == str(sub / "data" / "here.fits")


@pytest.mark.parametrize("lists", [False, True])
def test_rows_with_more_fields_than_the_header_are_bad_rows(tmp_path, monkeypatch,
                                                           lists):
    """Test that a CSV row with more fields than its header (which astropy
    refuses the whole file for) is a bad row naming its row and field
    counts, and every other row is read as astropy reads the file without
    it: ids as written, values, file lists and places."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    header = "SourceID,RA,Dec,diameter_pixel"
    good = ["007,10.5,-1.25,12", "x y,11.0,2.0,8", "3,12.0,3.5,9"]
    long = "9,13.0,4.0,10,oops"
    if lists:
        header += ",fits_file_paths"
        good = [g + f for g, f in zip(good, [",a.fits", ",\"['b.fits', 'c.fits']\"",
                                             ",d.fits"], strict=True)]
        long += ",e.fits"
    path = tmp_path / "cat.csv"
    path.write_text("\n".join([header, good[0], long, good[1], good[2]]) + "\n")
    cat = read_catalog(path)
    assert_array_equal(cat.status, [OK, BAD, OK, OK])
    assert list(cat.messages) == [1]
    assert cat.messages[1].startswith(
        f"cat.csv row 1 has {6 if lists else 5} fields where the header names "
        f"{5 if lists else 4} columns"
    )
    # the reference: the file without that row, as read alone
    ref_path = tmp_path / "ref.csv"
    ref_path.write_text("\n".join([header, *good]) + "\n")
    ref = read_catalog(ref_path)
    keep = [0, 2, 3]
    assert list(cat.source_id[keep]) == list(ref.source_id) == ["007", "x y", "3"]
    assert_array_equal(cat.ra[keep], ref.ra)
    assert_array_equal(cat.dec[keep], ref.dec)
    assert_array_equal(cat.size_pixel[keep], ref.size_pixel)
    if lists:
        assert [cat.fits_file_paths[i] for i in keep] == ref.fits_file_paths
    assert os.listdir(scratch) == []  # the copy read in its place is gone


def test_a_header_short_of_a_name_is_still_a_file_error(tmp_path, monkeypatch):
    """Test that when most rows have more fields than the header (a header
    that lacks a name), the file is refused as a whole, as astropy does,
    and no copy of it is left behind."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    path = tmp_path / "cat.csv"
    path.write_text("id,ra,dec\n1,10,1,12\n2,11,2,12\n3,12,3\n")
    with pytest.raises(CatalogError, match="cannot read catalogue"):
        read_catalog(path, size=10)
    assert os.listdir(scratch) == []


def test_fits_file_paths_list_cells(tmp_path):
    """Test that real list cells (Parquet, DataFrame) are read as tuples."""
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    df = pd.DataFrame(
        {
            "SourceID": ["a", "b", "c"],
            "RA": [1.0, 2.0, 3.0],
            "Dec": [0.0, 0.0, 0.0],
            "diameter_arcsec": [2.0, 2.0, 2.0],
            "fits_file_paths": [["/x/VIS.fits", "/x/H.fits"], ["y.fits"], []],
        }
    )
    path = tmp_path / "cat.parquet"
    df.to_parquet(path)
    for source, folder in ((df, None), (path, str(tmp_path))):
        cat = read_catalog(source)
        rel = "y.fits" if folder is None else os.path.join(folder, "y.fits")
        assert cat.fits_file_paths == [("/x/VIS.fits", "/x/H.fits"), (rel,), ()]
        assert_array_equal(cat.status, [OK, OK, BAD])
        assert "column 'fits_file_paths'" in cat.messages[2]


@pytest.mark.parametrize("kind", ["DataFrame", "parquet"])
def test_nullable_integer_ids_beyond_2_53_stay_exact(tmp_path, kind):
    """Test that 64-bit ids in a nullable integer column with a missing value
    (pandas ``Int64``, a Parquet column with nulls) are read exactly, as
    from an astropy masked column, not rounded through float64 (where the
    two ids below are equal and the second became a duplicate)."""
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    ids = [-528456789012345678, -528456789012345677, None]
    df = pd.DataFrame(
        {
            "SourceID": pd.array(ids, dtype="Int64"),
            "RA": [150.0, 150.01, 150.02],
            "Dec": [2.0, 2.0, 2.0],
            "diameter_pixel": pd.array([16, None, 16], dtype="Int64"),
            "flag": pd.array([True, None, False], dtype="boolean"),
        }
    )
    source = df
    if kind == "parquet":
        source = tmp_path / "cat.parquet"
        df.to_parquet(source)
    reference = Table(
        {
            "SourceID": MaskedColumn([ids[0], ids[1], 0], mask=[0, 0, 1]),
            "RA": df["RA"].to_numpy(),
            "Dec": df["Dec"].to_numpy(),
            "diameter_pixel": MaskedColumn([16, 0, 16], mask=[0, 1, 0]),
        }
    )
    cat, ref = read_catalog(source), read_catalog(reference)
    assert list(cat.source_id[:2]) == [str(i) for i in ids[:2]]
    assert_array_equal(cat.source_id, ref.source_id)
    assert_array_equal(cat.status, [OK, BAD, BAD])
    assert_array_equal(cat.status, ref.status)
    assert "column 'diameter_pixel': value is missing" in cat.messages[1]
    assert "column 'SourceID': value is missing" in cat.messages[2]


def test_angle_units_are_converted():
    """Test that RA/Dec columns with angular units are converted to degrees."""
    t = Table({"ra": [np.pi / 2], "dec": [0.5]})
    t["ra"].unit = "rad"
    t["dec"].unit = "arcmin"
    cat = read_catalog(t, size=4)
    np.testing.assert_allclose(cat.ra, [90.0])
    np.testing.assert_allclose(cat.dec, [0.5 / 60])


def test_empty_catalog():
    """Test that a catalogue without rows gives empty arrays."""
    cat = read_catalog(Table({"ra": np.zeros(0), "dec": np.zeros(0)}), size=4)
    assert len(cat) == 0
    assert cat.status.dtype == np.int16


# ---- file-level errors


def test_missing_file_raises(tmp_path):
    """Test that a missing catalogue file is a CatalogError naming it."""
    with pytest.raises(
        CatalogError, match=r"catalogue file '.*nope\.csv' does not exist"
    ):
        read_catalog(tmp_path / "nope.csv", size=4)


@pytest.mark.parametrize(
    "name", ["broken.fits", "broken.parquet", "broken.vot", "broken.ecsv"]
)
def test_unreadable_file_raises(tmp_path, name):
    """Test that an unreadable catalogue is a CatalogError naming file and format."""
    path = tmp_path / name
    path.write_bytes(b"this is not a table\x00\x01\x02")
    with pytest.raises(CatalogError, match=rf"cannot read catalogue '.*{name}'"):
        read_catalog(path, size=4)


def test_folder_raises(tmp_path):
    """Test that a folder given as catalogue is a CatalogError."""
    with pytest.raises(CatalogError, match="is a folder"):
        read_catalog(tmp_path, size=4)


def test_no_ra_column_suggests_closest(tmp_path):
    """Test that a missing RA column lists the columns and suggests the closest."""
    path = tmp_path / "c.csv"
    path.write_text("SourceID,R_A,Dec\n1,2,3\n")
    with pytest.raises(CatalogError, match=r"c\.csv' has no RA column") as info:
        read_catalog(path, size=4)
    text = str(info.value)
    assert "columns present: 'SourceID', 'R_A', 'Dec'" in text
    assert "Did you mean 'R_A'? Pass ra_column='R_A'" in text


def test_columns_differing_only_in_case_warn_and_can_be_chosen(tmp_path, caplog):
    """Test that columns whose names differ only in case ('ra' and 'RA') are
    a warning naming both and the one used (the first, silently, before),
    and that ra_column chooses the other without a warning."""
    path = tmp_path / "c.csv"
    path.write_text("SourceID,ra,RA,Dec\na,150.0,10.0,2.0\n")
    with caplog.at_level("WARNING", logger="cutana.catalog"):
        cat = read_catalog(path, size=4)
    assert cat.ra.tolist() == [150.0]
    (record,) = caplog.records
    assert record.getMessage() == (
        f"catalogue {str(path)!r} has columns 'ra' and 'RA', which differ only in "
        "case; using 'ra' (pass ra_column=NAME, or --ra-column NAME on the command "
        "line, to choose)"
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="cutana.catalog"):
        cat = read_catalog(path, size=4, ra_column="RA")
    assert cat.ra.tolist() == [10.0]
    assert not caplog.records


def test_no_dec_column_raises():
    """Test that a missing Dec column is a CatalogError."""
    t = Table({"ra": [1.0], "latitude": [2.0]})
    with pytest.raises(
        CatalogError, match=r"has no Dec column .* columns present: 'ra', 'latitude'"
    ):
        read_catalog(t, size=4)


def test_unknown_override_column_raises():
    """Test that a named column that does not exist is a CatalogError."""
    t = Table({"ra": [1.0], "dec": [2.0], "size_px": [3.0]})
    with pytest.raises(
        CatalogError, match=r"no column 'size_pix' \(given as size_column\).*'size_px'"
    ):
        read_catalog(t, size_column="size_pix")


def test_no_size_anywhere_raises():
    """Test that a catalogue without size column or size= is a CatalogError."""
    t = Table({"ra": [1.0], "dec": [2.0]})
    with pytest.raises(
        CatalogError, match="pass --size N.*diameter_pixel or diameter_arcsec"
    ):
        read_catalog(t)


def test_wrong_type_raises():
    """Test that a non-table input is a TypeError."""
    with pytest.raises(TypeError, match="catalog must be a file path"):
        read_catalog(42)


def test_large_csv_is_validated(tmp_path):
    """Test that a 100,000-row CSV with scattered bad rows is read row for row."""
    n = 100_000
    rng = np.random.default_rng(7)
    ra = rng.uniform(0, 360, n)
    dec = rng.uniform(-90, 90, n)
    bad = rng.choice(n, 50, replace=False)
    dec[bad] = 100.0
    t = Table(
        {
            "SourceID": np.arange(n),
            "RA": ra,
            "Dec": dec,
            "diameter_pixel": np.full(n, 64),
        }
    )
    path = _write(t, tmp_path / "big.csv")
    cat = read_catalog(path)
    assert len(cat) == n
    assert_array_equal(np.flatnonzero(cat.status == BAD), np.sort(bad))
    assert sorted(cat.messages) == sorted(bad.tolist())
    assert_array_equal(cat.source_id, np.arange(n).astype(str))


def test_csv_with_byte_order_mark_and_comments(tmp_path):
    """Test that a BOM and leading '#' comment lines do not hide columns or rows."""
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfSourceID,RA,Dec\n007,1,2\n008,3,4\n")
    cat = read_catalog(path, size=4)
    assert cat.columns["id"] == "SourceID"
    assert_array_equal(cat.source_id, ["007", "008"])
    path = tmp_path / "comments.csv"
    path.write_text(
        "# made by a survey pipeline\nSourceID,RA,Dec\n007,1,2\n\n08,3,95\n"
    )
    cat = read_catalog(path, size=4)
    assert_array_equal(cat.source_id, ["007", "08"])
    assert_array_equal(cat.status, [OK, BAD])
    assert cat.messages[1].startswith("comments.csv row 1 column 'Dec'")


@pytest.mark.parametrize("fallback", [False, True])
def test_csv_file_lists_read_apart_equal_table_read(tmp_path, monkeypatch, fallback):
    """The file-list column, read apart from the rest of a CSV, gives the same
    catalogue.

    Compared with the same file read by astropy into a Table first (comments,
    quoted lists, missing and broken cells, a file list repeated on many rows);
    with ``fallback`` the column is read with the rest, as when rows do not
    line up.
    """
    import cutana.catalog as catalog_module

    calls = []
    real = catalog_module._split_csv
    monkeypatch.setattr(
        catalog_module, "_split_csv",
        lambda *a: calls.append(a[1]) or (None if fallback else real(*a)),
    )
    lines = ["# ESA Cutana-style catalogue",
             "SourceID,RA,Dec,fits_file_paths,diameter_pixel"]
    cells = ['"[\'/t/a_VIS.fits\', \'/t/a_H.fits\']"', "/t/b.fits", "",
             "\"['/t/c.fits'\"", "\"('/t/d.fits',)\""]
    ids = ['"src,{}"', " s{} ", '"say ""{}"""', "{}"]
    for i in range(40):
        sid = ids[i % len(ids)].format(i)
        lines.append(f"{sid},{150 + i * 1e-3},{2.0 - i * 1e-3},{cells[i % len(cells)]},"
                     f"{10 + i % 3 if i != 7 else ''}")
    path = tmp_path / "cat.csv"
    path.write_text("\n".join(lines) + "\n")
    cat = read_catalog(str(path))
    ref = read_catalog(Table.read(str(path), format="ascii.csv", comment=r"\s*#"))
    assert cat.fits_file_paths == ref.fits_file_paths
    assert cat.fits_file_paths[0] == ("/t/a_VIS.fits", "/t/a_H.fits")
    assert cat.fits_file_paths[2] == ()
    np.testing.assert_array_equal(cat.status, ref.status)
    assert [m.split(" row ", 1)[1] for m in cat.messages.values()] == [
        m.split(" row ", 1)[1] for m in ref.messages.values()
    ]
    assert "value is missing" in cat.messages[2]
    np.testing.assert_array_equal(cat.source_id, ref.source_id)
    np.testing.assert_array_equal(cat.ra, ref.ra)
    assert list(cat.columns) == list(ref.columns)
    assert calls == ["fits_file_paths"]


def _size_cell(case, i, later):
    """Row ``i``'s size cell in the read-in-parts tests: from row ``later``
    on, floats after integers, a text cell or empty cells."""
    size = 10 + i % 3
    if case == "int_then_float" and i >= later:
        return f"{size}.5"
    if case == "text_later" and i == later + 8:
        return "big"
    if case == "masked_later" and i in (later + 5, later + 6):
        return ""
    return size


@pytest.mark.parametrize(
    "case", ["same", "int_then_float", "text_later", "masked_later"]
)
def test_a_split_csv_read_in_parts_equals_one_read(tmp_path, monkeypatch, case):
    """Test that the rest of a split CSV read by astropy in parts of a few
    lines (as catalogues of more than 500,000 rows are, to bound memory)
    gives the catalogue one read gives: also when a column is integers in
    one part and floats in another, when text in a later part makes a
    column text (the parts do not stack: it is read at once), and when a
    later part has empty cells (masked)."""
    import cutana.catalog as catalog_module

    lines = ["SourceID,RA,Dec,diameter_pixel,fits_file_paths"]
    for i in range(40):
        size = _size_cell(case, i, 25)
        lines.append(f"s{i},{150 + i * 1e-3},{2.0 - i * 1e-3},{size},"
                     f"\"['/t/a{i % 3}_VIS.fits', '/t/a{i % 3}_H.fits']\"")
    path = tmp_path / "cat.csv"
    path.write_text("\n".join(lines) + "\n")
    ref = read_catalog(str(path))  # one read
    reads = []
    real = Table.read
    monkeypatch.setattr(catalog_module, "_SPLIT_LINES", 7)
    # blocks of one line: at most a part and a block wait at once
    monkeypatch.setattr(catalog_module, "_SPLIT_BLOCK_CHARS", 1)
    monkeypatch.setattr(catalog_module.Table, "read", lambda *a, **k: reads.append(
        len(a[0]) if isinstance(a[0], list) else a[0]) or real(*a, **k))
    held = []  # lines waiting when a part may be read: they never pile up
    real_take = catalog_module._Parts.take
    monkeypatch.setattr(
        catalog_module._Parts, "take",
        lambda self, lines: held.append(len(lines)) or real_take(self, lines),
    )
    cat = read_catalog(str(path))
    parts = [7 + 1] * 5 + [5 + 1]  # each part with the header line
    assert reads == (parts + [41] if case == "text_later" else parts)
    assert held and max(held) == 1 + 7  # the header and one part at most
    np.testing.assert_array_equal(cat.source_id, ref.source_id)
    np.testing.assert_array_equal(cat.ra, ref.ra)
    np.testing.assert_array_equal(cat.size_pixel, ref.size_pixel)
    np.testing.assert_array_equal(cat.status, ref.status)
    assert cat.messages == ref.messages
    assert cat.fits_file_paths == ref.fits_file_paths
    if case == "masked_later":
        assert "value is missing" in cat.messages[30]



@pytest.mark.parametrize(
    "case",
    ["same", "int_then_float", "text_later", "masked_later", "comments", "quoted"],
)
def test_a_large_csv_read_in_parts_equals_one_read(tmp_path, monkeypatch, case):
    """Test that a large CSV (no file lists) read by astropy in parts of a
    few hundred bytes gives the catalogue one read gives: also when a column
    is integers in one part and floats in another, when text in a later part
    makes it text (read whole), with empty cells in a later part, with
    comment lines; a file with a quote is read whole."""
    import cutana.catalog as catalog_module

    lines = ["# a comment"] if case == "comments" else []
    lines.append("SourceID,RA,Dec,diameter_pixel")
    for i in range(60):
        size = _size_cell(case, i, 45)
        sid = f'"s,{i}"' if case == "quoted" and i == 3 else f"s{i:03d}"
        lines.append(f"{sid},{150 + i * 1e-3},{2.0 - i * 1e-3},{size}")
        if case == "comments" and i % 17 == 5:
            lines.append("# another comment")
    path = tmp_path / "cat.csv"
    path.write_text("\n".join(lines) + "\n")
    ref = read_catalog(str(path))  # one read
    monkeypatch.setattr(catalog_module, "_CSV_PART_BYTES", 300)
    monkeypatch.setattr(catalog_module, "_CSV_PARTS", 1)
    stacked = []
    real_vstack = catalog_module.vstack
    monkeypatch.setattr(
        catalog_module, "vstack",
        lambda tables, **k: stacked.append(len(tables)) or real_vstack(tables, **k),
    )
    cat = read_catalog(str(path))
    # parts were read (and stacked, or refused as text_later), except with a quote
    assert stacked == ([] if case == "quoted" else [stacked[0]]) and (
        case == "quoted" or stacked[0] >= len(path.read_bytes()) // 300
    )
    np.testing.assert_array_equal(cat.source_id, ref.source_id)
    np.testing.assert_array_equal(cat.ra, ref.ra)
    np.testing.assert_array_equal(cat.dec, ref.dec)
    np.testing.assert_array_equal(cat.size_pixel, ref.size_pixel)
    np.testing.assert_array_equal(cat.status, ref.status)
    assert cat.messages == ref.messages
    if case == "masked_later":
        assert "value is missing" in cat.messages[50]
    if case == "text_later":
        assert "big" in cat.messages[53]


@pytest.mark.parametrize("lists", [True, False])
def test_reading_progress_bar(tmp_path, monkeypatch, capsys, lists):
    """Test that reading a large CSV in parts (with file lists split off, or
    without, read by astropy in parts) shows a progress bar over its bytes
    when asked (past the delay, here 0 s), not otherwise, and reads the
    same catalogue either way."""
    import cutana.catalog as catalog_module

    monkeypatch.setattr(catalog_module, "READ_PROGRESS_DELAY", 0.0)
    monkeypatch.setattr(catalog_module, "_SPLIT_LINES", 7)
    monkeypatch.setattr(catalog_module, "_CSV_PART_BYTES", 300)
    monkeypatch.setattr(catalog_module, "_CSV_PARTS", 1)
    monkeypatch.setattr(catalog_module, "_SPLIT_BLOCK_CHARS", 1)  # line by line
    lines = ["SourceID,RA,Dec,diameter_pixel" + (",fits_file_paths" if lists else "")]
    for i in range(40):
        lines.append(f"s{i},{150 + i * 1e-3},{2.0 - i * 1e-3},{10 + i % 5}"
                     + (f",\"['/t/a{i % 3}_VIS.fits', '/t/a{i % 3}_H.fits']\""
                        if lists else ""))
    path = tmp_path / "cat.csv"
    path.write_text("\n".join(lines) + "\n")
    quiet = read_catalog(str(path))
    assert "reading catalogue" not in capsys.readouterr().err
    positions = []
    real_at = catalog_module._Progress.at
    monkeypatch.setattr(
        catalog_module._Progress, "at",
        lambda self, pos: positions.append(pos) or real_at(self, pos),
    )
    shown = read_catalog(str(path), progress=True)
    assert "reading catalogue" in capsys.readouterr().err
    # moved on part by part (astropy's parts of 300 bytes: within the file;
    # the split lines: as far as the file's buffer has read, here all of it)
    assert len(positions) >= 2 and positions == sorted(positions)
    assert 0 < positions[0] <= path.stat().st_size
    if not lists:
        assert positions[1] < path.stat().st_size
    for name in ("source_id", "ra", "dec", "size_pixel", "status"):
        np.testing.assert_array_equal(getattr(shown, name), getattr(quiet, name))
    assert shown.fits_file_paths == quiet.fits_file_paths


@settings(max_examples=200, deadline=None)
@given(
    ids=st.lists(
        st.sampled_from(["a", "b", "c", "ab", "", " ", "7", "a "]), max_size=40
    ),
    block=st.integers(1, 9),
)
def test_duplicate_ids_are_the_rows_after_the_first_of_their_id(ids, block):
    """Test `_duplicates` (sorted once, compared in blocks) against a
    first-seen dictionary: which rows repeat an earlier row's id, and which
    row that is; missing (blank) ids are neither."""
    from cutana.catalog import _duplicates

    values = np.array(ids, dtype=str) if ids else np.zeros(0, dtype="<U1")
    missing = np.array([not v.strip() for v in ids], dtype=bool)
    dup, first_of = _duplicates(values, missing, block=block)
    first = {}
    for i, v in enumerate(ids):
        if not v.strip():
            assert not dup[i]
            continue
        first.setdefault(v, i)
        assert dup[i] == (first[v] != i)
        if dup[i]:
            assert first_of[i] == first[v]

_CELL_ATOMS = ["a", "1.5", "", " ", '"', '""', ",", "#", "\r\n", "\n", "'", "[", "]",
               "\xe9", "x y", '"q"', '"a,b"', '"a""b"', "['/t/a.fits', '/t/b.fits']"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_before=st.integers(1, 4),
    rows=st.lists(
        st.tuples(
            st.integers(-1, 1),
            st.lists(
                st.lists(st.sampled_from(_CELL_ATOMS), max_size=3),
                min_size=6,
                max_size=6,
            ),
        ),
        max_size=6,
    ),
    end=st.sampled_from(["\n", "\r\n"]),
    last_end=st.booleans(),
    comments=st.booleans(),
    block=st.sampled_from([1, 2, 7, 30, 1 << 22]),
)
def test_split_of_a_last_file_list_column_equals_csv_module(
    n_before, rows, end, last_end, comments, block
):
    """Splitting lines at the last column's comma gives what the csv module gives.

    Hostile lines (quotes, commas and line breaks inside fields, missing and
    extra fields, blank and comment lines) go to the csv module alone, or
    send the whole file to it; either way lines and cells are its own. The
    file is split in blocks of ``block`` characters (and the rest of their
    last line), from a few lines to the whole file at once.
    """
    import cutana.catalog as catalog_module

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(catalog_module, "_SPLIT_BLOCK_CHARS", block)
        _check_split_equals_csv_module(n_before, rows, end, last_end, comments)


def _check_split_equals_csv_module(n_before, rows, end, last_end, comments):
    import cutana.catalog as catalog_module

    header = [f"c{i}" for i in range(n_before)] + ["fits_file_paths"]
    lines = [",".join(header)]
    for extra, fields in rows:
        k = len(header) + extra
        lines.append(",".join("".join(f) for f in fields[:k]))
    text = end.join(lines) + (end if last_end else "")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "cat.csv")
        with open(path, "w", newline="", encoding="utf-8") as f:
            f.write(text)
        fast = catalog_module._split_csv(path, "fits_file_paths", comments)
        real = catalog_module._split_last
        catalog_module._split_last = lambda *args: False
        try:
            slow = catalog_module._split_csv(path, "fits_file_paths", comments)
        finally:
            catalog_module._split_last = real
    assert (fast is None) == (slow is None)
    if fast is not None:
        assert fast.lines == slow.lines
        assert list(fast.cells) == list(slow.cells)
        assert fast.index == slow.index == n_before


def test_split_of_a_last_file_list_column_is_taken(tmp_path):
    """ESA Cutana's catalogues (file lists last, quoted or not) take the split."""
    import cutana.catalog as catalog_module

    path = tmp_path / "cat.csv"
    path.write_text(
        "SourceID,RA,Dec,diameter_pixel,fits_file_paths\n"
        "a,1.5,2.5,10,['/t/a.fits']\n"
        "b,1.5,2.5,10,\"['/t/a.fits', '/t/b.fits']\"\n"
        "\"c,d\",1.5,2.5,10,\"['/t/a.fits', '/t/\"\"b\"\".fits']\"\n"
    )
    rows = []
    real = catalog_module._split_last
    with open(path, newline="", encoding="utf-8") as f:
        next(f)
        assert real(f, 4, False, rows, [], {})
    split = catalog_module._split_csv(str(path), "fits_file_paths", False)
    assert list(split.cells) == [
        "['/t/a.fits']", "['/t/a.fits', '/t/b.fits']", "['/t/a.fits', '/t/\"b\".fits']"
    ]
    assert split.lines == [
        "SourceID,RA,Dec,diameter_pixel\n", "a,1.5,2.5,10\n", "b,1.5,2.5,10\n",
        '"c,d",1.5,2.5,10\n',
    ]


@pytest.mark.parametrize("end", ["\n", "\r\n"])
@pytest.mark.parametrize("last_end", [True, False])
def test_plain_lines_are_split_by_block(end, last_end):
    """Plain lines (the lines of ESA Cutana's catalogues) are split at once
    by `_split_block`, as `_split_lines` splits them one by one; a block
    with one line that is not plain is left to `_split_lines`."""
    from cutana.catalog import _split_block, _split_lines

    lines = [
        "a,1.5,2.5,10,['/t/a.fits']",
        'b,1.5,2.5,10,"[\'/t/a.fits\', \'/t/b.fits\']"',
        "c,1.5,2.5,10, ['/t/a.fits'] ",
        'd,1.5,2.5,10,  "[\'/t/\"\"c\"\".fits\']"',
        "e,1.5,2.5,10,['/t/a.fits']",
        "f,,,,",
    ]
    text = end.join(lines) + (end if last_end else "")
    seen, shared = {}, {}
    block = _split_block(text, 4, False, seen, shared)
    one_lines, one_cells = [], []
    assert _split_lines(io.StringIO(text, newline=""), 4, False, one_lines,
                        one_cells, {}, {})
    assert block == (one_lines, one_cells)
    assert block[0][:2] == ["a,1.5,2.5,10\n", "b,1.5,2.5,10\n"]
    assert block[1] == [
        "['/t/a.fits']", "['/t/a.fits', '/t/b.fits']", "['/t/a.fits']",
        "['/t/\"c\".fits']", "['/t/a.fits']", "",
    ]
    assert block[1][0] is block[1][2] is block[1][4]  # one string per value
    for odd in ['"a",1,2,3,x', "a, 1,2,3,x", " a,1,2,3,x", "a,1,2,x", "a,1,2\",3,x",
                "a,1,2,3,\"x", "a,1,2,3,x,y", "a\r,1,2,3,x", "\xe9,1,2,3,x", ""]:
        odd_text = end.join([lines[0], odd, lines[1]]) + end
        assert _split_block(odd_text, 4, False, {}, {}) is None, odd
    comment = end.join([lines[0], "# a note"]) + end
    assert _split_block(comment, 4, True, {}, {}) is None
    assert _split_block(comment, 4, False, {}, {}) is None  # (too few fields)


def test_csv_file_lists_of_a_non_utf8_file(tmp_path):
    """A CSV that is not UTF-8 is left to astropy, whose error names the file."""
    text = "SourceID,RA,Dec,fits_file_paths\n1,150.0,2.0,/t/caf\xe9.fits\n"
    path = tmp_path / "latin1.csv"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(CatalogError, match=r"latin1\.csv.*UnicodeDecodeError"):
        read_catalog(str(path), size=10)


def test_a_quote_never_closed_refuses_the_catalogue(tmp_path):
    """Test that a CSV line opening a quoted field that no quote closes
    refuses the file, naming that line: astropy reads every line after it
    into that field, and those rows were lost without a word. A quote
    inside an unquoted field, or in a comment line, leaves an odd count
    and is read as before."""
    bad = tmp_path / "bad.csv"
    bad.write_text('id,RA,Dec\na,150,2\n"b,150,2\nc,150,2\nd,150,2\n')
    with pytest.raises(CatalogError, match=r"bad.csv' line 3: a quote \(\"\) opens"):
        read_catalog(bad, size=16)
    # the quote's count even (a stray quote in an unquoted field before it)
    even = tmp_path / "even.csv"
    even.write_text('id,RA,Dec,note\na,150,2,5"\nb,150,2,"bad\nc,150,2,x\n')
    with pytest.raises(CatalogError, match=r"even.csv' line 3: a quote"):
        read_catalog(even, size=16)
    # more than the csv module's 131,072 characters after it
    long = tmp_path / "long.csv"
    rows = "".join(f"r{i},150,2\n" for i in range(20000))
    long.write_text('id,RA,Dec\na,150,2\n"b,150,2\n' + rows)
    with pytest.raises(CatalogError, match=r"long.csv' line 3: .* within 131,072"):
        read_catalog(long, size=16)
    fine = tmp_path / "fine.csv"
    fine.write_text(
        '# a "quoted" comment"\nid,RA,Dec\na,150,2\nb"x,150,2\n"c, d",150,2\n'
    )
    cat = read_catalog(fine, size=16)
    assert list(cat.source_id) == ["a", 'b"x', "c, d"]
    assert_array_equal(cat.status, [OK, OK, OK])
