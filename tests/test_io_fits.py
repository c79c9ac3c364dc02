# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of the FITS writer, safe file names and the FITS index."""

import os
import threading
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import Cutout2D as AstropyCutout2D
from astropy.table import Table
from astropy.wcs import WCS
from hypothesis import given, settings
from hypothesis import strategies as st

from cutana import Status
from cutana.io import (
    INDEX_NAME,
    FitsWriter,
    JobResult,
    fits_filenames,
    load_staged,
    open_output,
    read_index,
    stage_job,
    verify_output,
    write_index,
)

HOSTILE = [
    "../../etc/passwd",
    "/abs/path",
    "/",
    "a/b",
    "a_b",
    "A_B",
    "a\\b",
    "",
    ".",
    "..",
    ".hidden",
    "-rf",
    "x" * 5000,
    "nul\x00byte",
    "CON",
    "con.txt",
    "M31 ★ Andromède",
    "日本語",
    "a b",
    "a_b",
    "a\nb",
    "~user",
    "$HOME",
    "index",
    "-",
    "a_b.fits",
]


def _tile_wcs():
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.1, 2.2]
    w.wcs.crpix = [30.0, 20.5]
    w.wcs.cdelt = [-2.8e-5, 2.8e-5]
    w.wcs.pc = [[0.98, -0.17], [0.17, 0.98]]
    return w


def _cutouts(data, wcs, positions, size):
    """Astropy Cutout2D (partial mode) of each position, with its box origin."""
    cutouts, origin = [], []
    for pos in positions:
        c = AstropyCutout2D(data, pos, size, wcs=wcs, mode="partial", fill_value=0)
        cutouts.append(c)
        origin.append(
            (
                c.slices_original[1].start - c.slices_cutout[1].start,
                c.slices_original[0].start - c.slices_cutout[0].start,
            )
        )
    return cutouts, np.array(origin, dtype=np.int64)


def _is_inside(path, folder):
    return os.path.commonpath(
        [os.path.realpath(path), os.path.realpath(folder)]
    ) == os.path.realpath(folder)


# --------------------------------------------------------------------------
# file names
# --------------------------------------------------------------------------


def test_hostile_ids_give_safe_unique_names():
    """Test that no id yields a path outside the folder or a (case-blind) collision."""
    names = fits_filenames(HOSTILE)
    assert len(names) == len(HOSTILE)
    lowered = [n.lower() for n in names]
    assert len(set(lowered)) == len(names)
    for name in names:
        assert name.endswith(".fits")
        assert os.path.basename(name) == name
        assert not name.startswith((".", "-"))
        assert not {"/", "\\", "\0", " ", "\n"} & set(name)
        assert name.isascii()
        assert len(name) <= 120
    by_id = {}
    for source, name in zip(HOSTILE, names, strict=True):
        by_id.setdefault(
            source, name
        )  # the first of a repeated id keeps the plain name
    assert by_id["a_b"] == "a_b.fits"
    assert by_id["a/b"] != by_id["a_b"]
    assert by_id["A_B"].lower() != by_id["a_b"].lower()
    assert by_id["../../etc/passwd"].startswith("_._.._etc_passwd_")
    assert by_id["CON"].lower() != "con.fits"
    # names depend only on the ids: every process derives the same ones
    np.testing.assert_array_equal(fits_filenames(HOSTILE), names)


def test_crafted_id_cannot_take_a_hashed_name():
    """Test that an id equal to another id's hashed name still gets its own file."""
    first = fits_filenames(["a/b"])[0]
    names = fits_filenames(["a/b", first[:-5], first[:-5].upper()])
    assert len({n.lower() for n in names}) == 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=30))
def test_names_always_unique_and_plain(ids):
    """Test that any list of ids maps to unique plain names."""
    names = fits_filenames(ids)
    assert len({n.lower() for n in names}) == len(ids)
    for name in names:
        assert os.path.basename(name) == name and not name.startswith(".")


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------


def _job(data, wcs, positions, size, bands=2, dtype=np.float32):
    cutouts, origin = _cutouts(data, wcs, positions, size)
    images = np.stack(
        [np.stack([c.data * (b + 1) for b in range(bands)]) for c in cutouts]
    )
    inside = [
        c.slices_cutout == (slice(0, size[0]), slice(0, size[1])) for c in cutouts
    ]
    status = np.where(inside, Status.OK, Status.PARTIAL_OVERLAP).astype(np.int16)
    return cutouts, JobResult(
        job_id=0,
        rows=np.arange(len(positions)) * 2,
        images=images.astype(dtype),
        status=status,
        tile=0,
        origin=origin,
        box_shape=np.tile(size, (len(positions), 1)),
    )


@pytest.mark.parametrize("wcs_mode", ["tile", "per_source"])
def test_headers_and_wcs_match_cutout2d(tmp_path, wcs_mode):
    """Test that each file holds SRCID, position, tile and Cutout2D's WCS and data."""
    rng = np.random.default_rng(1)
    data = rng.normal(size=(40, 60)).astype(np.float32)
    wcs = _tile_wcs()
    positions = [(30.2, 20.7), (1.4, 38.9), (55.0, 10.3)]
    size = (7, 6)
    cutouts, job = _job(data, wcs, positions, size)
    out = tmp_path / "out"
    writer = FitsWriter.create(out, ["VIS", "nir_h"])
    ids = np.array(["src/1", "src 2", "NGC 1300"])
    files = fits_filenames(ids)
    wcs_arg = wcs if wcs_mode == "tile" else [c.wcs for c in cutouts]
    written = writer.write_sources(
        job,
        ids,
        [150.1, 150.2, 150.3],
        [2.2, 2.3, 2.4],
        [f"/tiles/{'deep/' * 20}T1_VIS.fits", "s3://bucket/T1_H.fits"],
        wcs_arg,
        files,
        header={"BUNIT": "Jy"},
    )
    np.testing.assert_array_equal(written, files)
    pix = np.array([[0, 0], [5, 6], [2.5, 3.25], [-1.0, 8.0]])
    for k, c in enumerate(cutouts):
        with fits.open(out / files[k]) as hdul:
            assert [h.name for h in hdul] == ["PRIMARY", "VIS", "NIR_H"]
            assert hdul[0].header["SRCID"] == ids[k]
            for b, hdu in enumerate(hdul[1:]):
                h = hdu.header
                assert h["SRCID"] == ids[k]
                assert h["RA"] == [150.1, 150.2, 150.3][k]
                assert h["ROW"] == 2 * k
                assert h["STATUS"] == job.status[k]
                # the whole path: tiles of two folders may share a file name
                assert h["TILE"] == [
                    f"/tiles/{'deep/' * 20}T1_VIS.fits", "s3://bucket/T1_H.fits"
                ][b]
                assert h["BUNIT"] == "Jy"
                np.testing.assert_array_equal(hdu.data, c.data * (b + 1))
                got = WCS(h).pixel_to_world(pix[:, 0], pix[:, 1])
                exp = c.wcs.pixel_to_world(pix[:, 0], pix[:, 1])
                np.testing.assert_allclose(got.ra.deg, exp.ra.deg, rtol=0, atol=1e-12)
                np.testing.assert_allclose(got.dec.deg, exp.dec.deg, rtol=0, atol=1e-12)
    # nothing but the cutouts (and the bookkeeping folder) in the output
    assert sorted(os.listdir(out)) == sorted([*files, ".cutana"])
    assert os.listdir(out / ".cutana" / "tmp") == []


def test_sip_tile_without_sip_ctype_writes_quietly(tmp_path):
    """Test that the cutouts of a tile whose SIP coefficients lie under a
    CTYPE without "-SIP" get astropy's consistent header (CTYPE with the
    suffix, the distortion kept, Cutout2D's WCS) without astropy logging its
    dozen lines for every file, as it did (indexing reports it once)."""
    from astropy import log

    header = _tile_wcs().to_header()
    for key, value in {"A_ORDER": 2, "B_ORDER": 2, "A_2_0": 3e-5, "B_0_2": -2e-5,
                       "A_1_1": 1e-5}.items():
        header[key] = value
    with log.log_to_list():  # (astropy's note on making it: not the writer's)
        wcs = WCS(header)
    assert wcs.sip is not None and wcs.wcs.ctype[0] == "RA---TAN"
    data = np.random.default_rng(2).normal(size=(40, 60)).astype(np.float32)
    positions = [(30.2, 20.7), (10.4, 8.9), (50.0, 30.3)]
    cutouts, job = _job(data, wcs, positions, (7, 6), bands=1)
    out = tmp_path / "out"
    writer = FitsWriter.create(out, ["VIS"])
    files = fits_filenames(np.array(["a", "b", "c"]))
    with log.log_to_list() as records:
        writer.write_sources(job, ["a", "b", "c"], [150.1] * 3, [2.2] * 3,
                             ["/tiles/T.fits"], wcs, files)
    assert not [r for r in records if "SIP" in str(r.msg)]
    pix = np.array([[0, 0], [5, 6], [2.5, 3.25], [-1.0, 8.0]])
    for k, c in enumerate(cutouts):
        h = fits.getheader(out / files[k], 1)
        assert (h["CTYPE1"], h["CTYPE2"]) == ("RA---TAN-SIP", "DEC--TAN-SIP")
        got = WCS(h).pixel_to_world(pix[:, 0], pix[:, 1])
        exp = c.wcs.pixel_to_world(pix[:, 0], pix[:, 1])
        np.testing.assert_allclose(got.ra.deg, exp.ra.deg, rtol=0, atol=1e-12)
        np.testing.assert_allclose(got.dec.deg, exp.dec.deg, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(fits.getdata(out / files[k], 1), c.data)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_dtypes_round_trip(tmp_path, dtype):
    """Test that integer and float cutouts keep their values and dtype."""
    rng = np.random.default_rng(2)
    n = 3
    images = rng.integers(0, np.iinfo(np.uint8).max, size=(n, 1, 4, 5)).astype(dtype)
    job = JobResult(
        job_id=1,
        rows=np.arange(n),
        images=images,
        status=np.zeros(n, np.int16),
        tile=0,
        origin=np.zeros((n, 2), int),
        box_shape=np.full((n, 2), 4),
    )
    writer = FitsWriter(tmp_path, ["g"])
    files = fits_filenames(["a", "b", "c"])
    writer.write_sources(
        job, ["a", "b", "c"], np.zeros(n), np.zeros(n), ["t.fits"], [None] * n, files
    )
    for k in range(n):
        data = fits.getdata(tmp_path / files[k], ext=1)
        assert data.dtype.type == np.dtype(dtype).type
        np.testing.assert_array_equal(data, images[k, 0])


def _ones_job(n):
    """A job of ``n`` complete 2 x 2 cutouts of ones, in one band."""
    return JobResult(
        job_id=0,
        rows=np.arange(n),
        images=np.ones((n, 1, 2, 2), np.float32),
        status=np.zeros(n, np.int16),
        tile=0,
        origin=np.zeros((n, 2), int),
        box_shape=np.full((n, 2), 2),
    )


def test_hostile_ids_never_escape(tmp_path):
    """Test that writing cutouts of hostile ids creates files only inside the folder."""
    n = len(HOSTILE)
    out = tmp_path / "deep" / "out"
    job = _ones_job(n)
    writer = FitsWriter.create(out, ["b"])
    files = fits_filenames(HOSTILE)
    writer.write_sources(
        job, HOSTILE, np.zeros(n), np.zeros(n), ["t.fits"], [None] * n, files
    )
    found = []
    for root, _, names in os.walk(tmp_path):
        found += [os.path.join(root, name) for name in names]
    assert len(found) == n
    assert all(_is_inside(path, out) for path in found)
    # each file says which id it holds (escaped to ASCII in the header)
    srcids = {fits.getval(out / f, "SRCID", ext=0) for f in files}
    assert len(srcids) == len(set(HOSTILE))
    assert (
        fits.getval(out / files[HOSTILE.index("日本語")], "SRCID")
        == "\\u65e5\\u672c\\u8a9e"
    )


def test_srcid_gives_back_every_id(tmp_path):
    """Test that SRCID tells ids apart that plain escaping would merge (a
    literal backslash sequence and the character it names, trailing blanks,
    which FITS drops) and decodes back to each id."""
    import codecs

    ids = ["\u00e9", "\\xe9", "a\tb", "a\\x09b", "trail ", "trail", " lead", "日本"]
    n = len(ids)
    job = JobResult(
        job_id=0, rows=np.arange(n), images=np.zeros((n, 1, 3, 3), np.float32),
        status=np.zeros(n, np.int16), tile=0, origin=np.zeros((n, 2), int),
        box_shape=np.full((n, 2), 3),
    )
    out = tmp_path / "out"
    writer = FitsWriter.create(out, ["b"])
    files = fits_filenames(ids)
    zeros = np.zeros(n)
    writer.write_sources(job, ids, zeros, zeros, ["t.fits"], [None] * n, files)
    srcids = [fits.getval(out / f, "SRCID", ext=0) for f in files]
    assert len(set(srcids)) == n
    assert [codecs.decode(v, "unicode_escape") for v in srcids] == ids


def test_unsafe_file_names_refused(tmp_path):
    """Test that file names not made by fits_filenames are refused before writing."""
    job = JobResult(
        job_id=0,
        rows=np.arange(1),
        images=np.ones((1, 1, 2, 2), np.float32),
        status=np.zeros(1, np.int16),
        tile=0,
        origin=np.zeros((1, 2), int),
        box_shape=np.full((1, 2), 2),
    )
    writer = FitsWriter(tmp_path / "out", ["b"])
    for bad in ["../x.fits", "/tmp/x.fits", ".x.fits", "a/b.fits", "", "a b.fits"]:
        with pytest.raises(ValueError, match="unsafe output file name"):
            writer.write_sources(job, ["x"], [0.0], [0.0], ["t"], [None], [bad])
    assert not any(n.endswith(".fits") for n in os.listdir(tmp_path / "out"))


def test_rows_without_cutout_get_no_file(tmp_path):
    """Test that only OK and partial-overlap rows get a file."""
    n = 4
    job = JobResult(
        job_id=0,
        rows=np.arange(n),
        images=np.ones((n, 1, 2, 2), np.float32),
        status=np.array([0, 1, 4, 2], np.int16),
        tile=0,
        origin=np.zeros((n, 2), int),
        box_shape=np.full((n, 2), 2),
    )
    files = fits_filenames(["a", "b", "c", "d"])
    written = FitsWriter(tmp_path, ["b"]).write_sources(
        job, ["a", "b", "c", "d"], np.zeros(n), np.zeros(n), ["t"], [None] * n, files
    )
    assert written.tolist() == ["a.fits", "b.fits", "", ""]


def test_index_and_reader(tmp_path):
    """Test that index.ecsv lists every row and open_output reads the folder back."""
    rng = np.random.default_rng(5)
    data = rng.normal(size=(40, 60)).astype(np.float32)
    wcs = _tile_wcs()
    positions = [(30.2, 20.7), (1.4, 38.9)]
    cutouts, job = _job(data, wcs, positions, (5, 5), bands=1)
    out = tmp_path / "out"
    writer = FitsWriter.create(out, ["vis"])
    ids = np.array(["s0", "", "s/2", "s3"])  # rows 0 and 2 belong to the job
    names = fits_filenames(ids)
    written = writer.write_sources(
        job, ids[[0, 2]], [1.0, 2.0], [3.0, 4.0], ["t.fits"], wcs, names[[0, 2]]
    )
    files = np.array(["", "", "", ""], dtype=object)
    files[[0, 2]] = written
    status = np.array([job.status[0], Status.BAD_ROW, job.status[1], Status.NO_OVERLAP])
    write_index(
        out,
        np.arange(4),
        ids,
        status,
        files.astype(str),
        {1: "empty id", 3: "off"},
        ra=[1.0, np.nan, 2.0, 5.0],
        dec=[3.0, np.nan, 4.0, 6.0],
        meta={"bands": ["vis"], "config": {"size": 5}},
    )
    table = Table.read(out / INDEX_NAME, format="ascii.ecsv")
    assert list(table["row"]) == [0, 1, 2, 3]
    assert list(table["status"]) == status.tolist()
    archive = open_output(out)
    assert len(archive) == 4
    assert archive.files.tolist() == [names[0], "", names[2], ""]
    assert archive.bands == ["vis"]
    assert archive.config == {"size": 5}
    np.testing.assert_array_equal(archive[2][0], cutouts[1].data)
    pix = np.array([[0.0, 0.0], [4.0, 3.0]])
    got = archive.wcs(2).pixel_to_world(pix[:, 0], pix[:, 1])
    exp = cutouts[1].wcs.pixel_to_world(pix[:, 0], pix[:, 1])
    np.testing.assert_allclose(got.ra.deg, exp.ra.deg, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="row 1 has no cutout file"):
        archive[1]
    assert archive.images[0:1].shape == (1, 1, 5, 5)
    assert list(archive.to_table()["status_name"])[1] == "BAD_ROW"
    assert verify_output(out) == []
    os.remove(out / names[2])
    problems = verify_output(out)
    assert len(problems) == 1 and "row 2" in problems[0]


def _index_inputs(n):
    """Index columns of ``n`` rows: odd ids and messages, NaN positions."""
    odd = ["a b", "é", "", '"q"', "x,y", "#7"]
    ids = np.array([odd[i % 6] + str(i) for i in range(n)])
    status = np.array([int(list(Status)[i % len(Status)]) for i in range(n)])
    files = [f"{i}.fits" if i % 3 else "" for i in range(n)]
    reasons = ["off the tile", 'a "quoted" reason', "ü"]
    messages = {i: reasons[i % 3] for i in range(0, n, 4)}
    ra = np.where(np.arange(n) % 5 == 0, np.nan, np.linspace(0.5, 359.5, n))
    dec = np.linspace(-89.5, 89.5, n)
    return ids, status, files, messages, ra, dec


@pytest.mark.parametrize("n", [0, 5, 23])
def test_index_written_in_parts_is_one_astropy_write(tmp_path, monkeypatch, n):
    """Test that an index written 5 rows at a time holds the same bytes as
    astropy's ECSV writer gives for the whole table at once."""
    from cutana.io import fits as fits_io

    monkeypatch.setattr(fits_io, "INDEX_PART_ROWS", 5)
    ids, status, files, messages, ra, dec = _index_inputs(n)
    path = write_index(tmp_path, np.arange(n), ids, status, files, messages,
                       ra=ra, dec=dec, meta={"bands": ["vis", "y"]})
    written = Table.read(path, format="ascii.ecsv")
    assert written.meta["bands"] == ["vis", "y"]
    whole = Table({
        "row": np.arange(n),
        "source_id": ids.astype(str),
        "status": status.astype(np.int16),
        "ra": ra,
        "dec": dec,
        "file": np.array(files, dtype=str),
        "message": np.array([messages.get(i, "") for i in range(n)], dtype=str),
    })
    whole["status"].description = written["status"].description
    whole["ra"].unit = whole["dec"].unit = "deg"
    whole.meta.update(written.meta)
    whole.write(tmp_path / "whole.ecsv", format="ascii.ecsv")
    with open(path, "rb") as a, open(tmp_path / "whole.ecsv", "rb") as b:
        assert a.read() == b.read()
    assert written["source_id"].tolist() == ids.tolist()
    # (astropy reads an empty text as masked)
    got = [m or "" for m in written["message"].tolist()]
    assert got == [messages.get(i, "") for i in range(n)]


def test_index_parts_with_another_header_are_written_whole(tmp_path, monkeypatch):
    """Test that when a part's ECSV header differs from the empty table's,
    the index is written in one piece, as astropy writes it."""
    from cutana.io import fits as fits_io

    real = fits_io._ecsv_text

    def numbered(table):  # a header that names the part's length
        first, rest = real(table).split("\n", 1)
        return f"{first}\n# rows: {len(table)}\n{rest}"

    monkeypatch.setattr(fits_io, "INDEX_PART_ROWS", 5)
    monkeypatch.setattr(fits_io, "_ecsv_text", numbered)
    ids, status, files, messages, ra, dec = _index_inputs(12)
    path = write_index(tmp_path, np.arange(12), ids, status, files, messages)
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    assert text.split("\n")[1] == "# rows: 12"
    assert text.count("# rows") == 1
    table = Table.read(text.replace("# rows: 12\n", ""), format="ascii.ecsv")
    assert table["row"].tolist() == list(range(12))
    assert "ra" not in table.colnames


def _astropy_index(path):
    """The columns of an index as one astropy read of the whole file gives
    them: masked (empty) text ``''``, and messages of the rows with one."""
    table = Table.read(path, format="ascii.ecsv")
    columns = {}
    for name in table.colnames:
        col = table[name]
        columns[name] = (
            np.asarray(col.filled("")) if hasattr(col, "filled") else np.asarray(col)
        )
    text = columns.pop("message")
    messages = {i: str(m) for i, m in enumerate(text.tolist()) if m}
    return table.meta, columns, messages


@pytest.mark.parametrize(
    ("n", "extra"),
    [(0, {}), (5, {}), (23, {}), (23, {7: "two\nlines"}), (23, {9: "a \0 b"})],
)
def test_index_read_in_parts_is_one_astropy_read(tmp_path, monkeypatch, n, extra):
    """Test that `read_index`, reading 5 rows at a time, gives the columns,
    messages and metadata of one astropy read of the whole index, also
    with a message going on to the next line (then read whole) or a NUL."""
    from cutana.io import fits as fits_io

    monkeypatch.setattr(fits_io, "INDEX_PART_ROWS", 5)
    ids, status, files, messages, ra, dec = _index_inputs(n)
    messages.update(extra)
    path = write_index(tmp_path, np.arange(n), ids, status, files, messages,
                       ra=ra, dec=dec, meta={"bands": ["vis", "y"]})
    lines_read = []
    real_read = Table.read

    def spy(source, **kw):
        lines_read.append(len(source) if isinstance(source, list) else source)
        return real_read(source, **kw)

    monkeypatch.setattr(fits_io.Table, "read", spy)
    index = read_index(tmp_path)
    monkeypatch.setattr(fits_io.Table, "read", real_read)
    meta, columns, stored = _astropy_index(path)
    assert index.meta == dict(meta)
    assert index.meta["bands"] == ["vis", "y"]
    assert list(index.columns) == list(columns)
    assert len(index) == n
    for name, values in columns.items():
        np.testing.assert_array_equal(index.columns[name], values, err_msg=name)
    assert index.columns["status"].dtype == np.int16
    assert index.messages == stored == messages
    if "\n" in "".join(extra.values()):  # an odd line: the file read whole
        assert lines_read[-1] == path
    else:  # the header's lines, and at most 5 data lines each time
        with open(path, encoding="utf-8") as fh:
            header = sum(1 for line in fh if line[0] == "#") + 1
        assert all(k - header <= 5 for k in lines_read)
        assert sum(k - header for k in lines_read) == n
        assert len(lines_read) == max(1, -(-n // 5))


def test_index_that_astropy_refuses_is_read_whole_for_the_error(tmp_path, monkeypatch):
    """Test that a line astropy cannot parse, in the second part of an index,
    gets astropy's error for the whole file: it names the line in the file,
    not in the part."""
    from astropy.io.ascii import InconsistentTableError

    from cutana.io import fits as fits_io

    monkeypatch.setattr(fits_io, "INDEX_PART_ROWS", 5)
    ids, status, files, messages, ra, dec = _index_inputs(12)
    path = write_index(tmp_path, np.arange(12), ids, status, files, messages)
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    data = next(i for i, line in enumerate(lines) if line[0] != "#") + 1
    lines[data + 7] = "7 only-two\n"
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(lines)
    with pytest.raises(InconsistentTableError) as whole:
        Table.read(path, format="ascii.ecsv")
    assert "data line 7" in str(whole.value)
    with pytest.raises(InconsistentTableError) as ours:
        read_index(tmp_path)
    assert str(ours.value) == str(whole.value)
    with pytest.raises(ValueError, match="data line 7"):
        open_output(tmp_path)
    assert any(
        p.startswith(f"cannot read {INDEX_NAME}") and "data line 7" in p
        for p in verify_output(tmp_path)
    )


def test_overwrite_reads_the_index_in_parts(tmp_path, monkeypatch):
    """Test that replacing a FITS output removes the files its index lists
    (read in parts), also one without cutana's keyword, by a pool of
    threads in batches, and keeps a foreign one."""
    from cutana.io import fits as fits_io

    monkeypatch.setattr(fits_io, "INDEX_PART_ROWS", 2)
    out = tmp_path / "out"
    writer = FitsWriter.create(out, ["b"])
    n = 5
    job = _ones_job(n)
    ids = np.array([f"s{i}" for i in range(n)])
    names = writer.write_sources(
        job, ids, np.zeros(n), np.zeros(n), ["t.fits"], None, fits_filenames(ids)
    )
    write_index(out, np.arange(n), ids, np.zeros(n), names, {})
    fits.PrimaryHDU().writeto(out / "foreign.fits")
    # a listed file is ours by the index alone (its header says nothing)
    fits.PrimaryHDU().writeto(out / names[3], overwrite=True)
    assert len(os.listdir(out)) == n + 3  # the files, the index, the state
    monkeypatch.setattr(fits_io, "_REMOVE_BATCH", 2)
    removed, real_remove = [], os.remove

    def spy(path):
        removed.append((os.path.basename(path), threading.current_thread().name))
        real_remove(path)

    monkeypatch.setattr(os, "remove", spy)
    FitsWriter.create(out, ["b"], overwrite=True)
    monkeypatch.setattr(os, "remove", real_remove)
    assert sorted(os.listdir(out)) == [".cutana", "foreign.fits"]
    files = {name: thread for name, thread in removed if name.endswith(".fits")}
    assert sorted(files) == sorted(names)  # in batches of 2, by the pool
    assert "MainThread" not in files.values()


def test_create_refuses_and_overwrites_safely(tmp_path):
    """Test that an old output needs overwrite, and overwrite keeps foreign files."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no cutana output"):
        FitsWriter.create(out, ["b"])
    os.remove(out / "notes.txt")
    writer = FitsWriter.create(out, ["b"])
    job = JobResult(
        job_id=0,
        rows=np.arange(1),
        images=np.ones((1, 1, 2, 2), np.float32),
        status=np.zeros(1, np.int16),
        tile=0,
        origin=np.zeros((1, 2), int),
        box_shape=np.full((1, 2), 2),
    )
    written = writer.write_sources(job, ["x"], [0.0], [0.0], ["t"], [None], ["x.fits"])
    write_index(out, [0], ["x"], [0], written, {})
    fits.PrimaryHDU(np.zeros((2, 2))).writeto(out / "users_tile.fits")
    with pytest.raises(FileExistsError, match="already exists"):
        FitsWriter.create(out, ["b"])
    FitsWriter.create(out, ["b"], overwrite=True)
    assert sorted(os.listdir(out)) == [".cutana", "users_tile.fits"]


def test_fits_job_staging_keeps_files(tmp_path):
    """Test that a FITS job is staged without pixels but with its file names."""
    job = JobResult(
        job_id=4,
        rows=np.array([3, 9]),
        images=np.ones((2, 1, 2, 2), np.float32),
        status=np.array([0, 2], np.int16),
        tile=1,
        origin=np.zeros((2, 2), int),
        box_shape=np.full((2, 2), 2),
        files=np.array(["a.fits", ""]),
        messages={9: "no overlap"},
    )
    staged = stage_job(tmp_path, job, images=False)
    assert not os.path.exists(os.path.join(staged.path, "images.npy"))
    back = load_staged(tmp_path, 4, checksum=staged.checksum)
    assert back.files.tolist() == ["a.fits", ""]
    assert back.images.shape == (2, 0, 0, 0)
    assert back.messages == {9: "no overlap"}


@pytest.mark.parametrize("length", [20, 55, 60, 68, 69, 120])
def test_long_tile_paths_and_ids_are_written_whole(tmp_path, length):
    """Test that a tile path or source id too long for its comment on one
    card (about 45 to 68 characters) is written whole, without the comment, and
    without astropy's VerifyWarning (an error under -W error, which failed
    every job), and a longer one over CONTINUE cards with it."""
    source_id = "S" * length
    tile = "/" + "d" * (length - 6) + ".fits"
    job = JobResult(
        job_id=0, rows=np.arange(1), images=np.ones((1, 1, 3, 3), np.float32),
        status=np.zeros(1, np.int16), tile=0, origin=np.zeros((1, 2), int),
        box_shape=np.full((1, 2), 3),
    )
    writer = FitsWriter.create(tmp_path / "out", ["VIS"])
    files = fits_filenames([source_id])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        writer.write_sources(job, [source_id], [1.0], [2.0], [tile], [None], files)
    with fits.open(tmp_path / "out" / files[0]) as hdul:
        header = hdul[1].header
        assert header["TILE"] == tile
        assert header["SRCID"] == source_id
        assert hdul[0].header["SRCID"] == source_id
        # a comment is whole or left out, never cut; kept on short values
        # and on CONTINUE cards
        keep = length < 40 or length > 68
        assert header.comments["TILE"] in ("", "tile file of band VIS")
        assert header.comments["SRCID"] in ("", "source id")
        if keep:
            assert header.comments["TILE"] == "tile file of band VIS"
            assert header.comments["SRCID"] == "source id"


@pytest.mark.parametrize("syncfs", [True, False])
def test_a_job_s_files_appear_only_once_all_are_on_disk(
    tmp_path, monkeypatch, syncfs
):
    """Test that a job's FITS files are renamed to their names only after
    every one of them is written and flushed (one syncfs on Linux, else a
    fsync each): a failure while writing the third file leaves no file of
    the job and no temporary file; a job that succeeds leaves them all."""
    from cutana.io import fits as fits_module

    if not syncfs:
        monkeypatch.setattr(fits_module, "_syncfs", lambda: None)
    synced = []
    real_sync = fits_module._sync_files
    monkeypatch.setattr(
        fits_module, "_sync_files",
        lambda paths, folder: (synced.append(len(paths)), real_sync(paths, folder)),
    )
    n = 4
    job = JobResult(
        job_id=0, rows=np.arange(n), images=np.ones((n, 1, 3, 3), np.float32),
        status=np.zeros(n, np.int16), tile=0, origin=np.zeros((n, 2), int),
        box_shape=np.full((n, 2), 3),
    )
    ids = [f"s{i}" for i in range(n)]
    files = fits_filenames(ids)
    writer = FitsWriter.create(tmp_path / "out", ["VIS"])
    calls = {"n": 0}
    real_write = fits_module._FileBatch.write

    def failing(self, content, final):
        calls["n"] += 1
        real_write(self, content, final)  # its temporary file is there
        if calls["n"] == 3:
            msg = "disk trouble"
            raise OSError(msg)

    monkeypatch.setattr(fits_module._FileBatch, "write", failing)
    zeros = np.zeros(n)
    with pytest.raises(OSError, match="disk trouble"):
        writer.write_sources(job, ids, zeros, zeros, ["t.fits"], None, files)
    assert calls["n"] == 3
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".fits")]
    assert not os.listdir(writer._tmp_dir)
    assert synced == []
    monkeypatch.setattr(fits_module._FileBatch, "write", real_write)
    written = writer.write_sources(
        job, ids, np.zeros(n), np.zeros(n), ["t.fits"], None, files
    )
    assert sorted(os.listdir(tmp_path / "out")) == sorted([*written, ".cutana"])
    assert synced == [n]
    for name in written:
        np.testing.assert_array_equal(fits.getdata(tmp_path / "out" / name, 1), 1)


def _sip_wcs():
    """A tile WCS with SIP distortion (a longer header, with -SIP types)."""
    w = _tile_wcs()
    header = w.to_header()
    header["CTYPE1"], header["CTYPE2"] = "RA---TAN-SIP", "DEC--TAN-SIP"
    header["A_ORDER"] = header["B_ORDER"] = 2
    header["A_2_0"], header["B_0_2"] = 2e-6, -3e-6
    return WCS(header)


def _cd_wcs():
    """A tile WCS with a CD matrix (rotated), far from its reference pixel."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [10.0, -45.0]
    w.wcs.crpix = [-1234.25, 9876.5]
    w.wcs.cd = [[-2.7e-5, 1.1e-6], [1.3e-6, 2.7e-5]]
    return w


def _astropy_wcs_text(wcs, origin, shape, out_shape):
    from cutana.cutout import cutout_wcs
    from cutana.io.fits import _wcs_header

    header = _wcs_header(cutout_wcs(wcs, origin, shape, out_shape))
    return header.tostring(endcard=False, padding=False)


@pytest.mark.parametrize("kind", ["pc", "sip", "cd"])
@pytest.mark.parametrize("resampled", [False, True])
def test_cutout_headers_are_astropys(kind, resampled, monkeypatch):
    """Test that the WCS header texts `_CutoutHeaders` makes (astropy's for
    the first two cutouts of a shape, the first one's text with wcslib's
    CRPIX cards for the next) equal astropy's for every cutout: PC, CD and
    SIP tile WCS, extracted and resampled shapes, origins off the tile."""
    from cutana.io import fits as fits_io

    wcs = {"pc": _tile_wcs, "sip": _sip_wcs, "cd": _cd_wcs}[kind]()
    headers = fits_io._CutoutHeaders(wcs)
    made = []
    real = fits_io._wcs_text
    monkeypatch.setattr(fits_io, "_wcs_text", lambda w: made.append(1) or real(w))
    rng = np.random.default_rng(11)
    shapes = [(9, 8), (33, 33), (128, 128), (1, 1)]
    for _ in range(120):
        shape = shapes[int(rng.integers(len(shapes)))]
        origin = (int(rng.integers(-200, 20000)), int(rng.integers(-200, 20000)))
        out = (16, 16) if resampled else shape
        text, keys = headers.text(origin, shape, out)
        assert text == _astropy_wcs_text(wcs, origin, shape, out)
        assert keys == {c[:8].strip() for c in _cards(text)}
    assert len(made) == 2 * len(shapes)  # astropy made only the first two


def _cards(text):
    return [text[i : i + 80] for i in range(0, len(text), 80)]


def test_cutout_headers_that_differ_are_made_by_astropy(monkeypatch):
    """Test that when the second cutout of a shape, made both ways, differs
    (here: a spoilt CRPIX card), astropy makes every header of that shape."""
    from cutana.io import fits as fits_io

    wcs = _sip_wcs()
    headers = fits_io._CutoutHeaders(wcs)
    real = fits_io._CutoutHeaders._with_crpix
    monkeypatch.setattr(
        fits_io._CutoutHeaders, "_with_crpix",
        staticmethod(lambda *a: real(*a).replace("CRPIX1  =", "CRPIX1  = 1 ")[:-3]),
    )
    for k in range(6):
        origin, shape = (k * 7 - 3, 5 - k), (9, 8)
        text, _ = headers.text(origin, shape, shape)
        assert text == _astropy_wcs_text(wcs, origin, shape, shape)
    assert list(headers._shapes.values()) == [None]


@pytest.mark.parametrize(
    ("dtype", "wcs_mode", "bands"),
    [
        (np.float32, "tile", 2),
        (np.float32, "sip", 1),
        (np.uint8, "per_source", 3),
        (np.uint16, "headers", 2),
        (np.float64, "none", 1),
        (np.int16, "tile", 1),
        (np.int32, "tile", 1),
        (np.float32, "clashing", 2),
    ],
)
def test_fits_files_are_the_bytes_astropy_writes(
    tmp_path, monkeypatch, dtype, wcs_mode, bands
):
    """Test that the files put together from card images (`_Layout`) are,
    byte for byte, those astropy writes from the same HDUs: every dtype,
    WCS kind (tile WCS with or without SIP, per-source WCS or headers,
    none), long and non-ASCII ids and tile paths, extra keywords, NaN and
    extreme values. A per-source header with keywords astropy would merge
    (here ``BUNIT``, ``EXTNAME``, ``SRCID``) is written by astropy."""
    from cutana.io import fits as fits_io

    rng = np.random.default_rng(5)
    data = rng.normal(size=(40, 60)).astype(np.float32)
    wcs = _sip_wcs() if wcs_mode == "sip" else _tile_wcs()
    positions = [(30.2, 20.7), (1.4, 38.9), (55.0, 10.3), (20.0, 20.0)]
    cutouts, job = _job(data, wcs, positions, (9, 8), bands=bands)
    images = job.images
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        images = rng.integers(info.min, info.max, size=images.shape, endpoint=True)
        images[0, 0, 0, :2] = info.min, info.max
    else:
        images = images.astype(dtype)
        images[0, 0, 0, 0] = np.nan
    job.images = images.astype(dtype)
    if wcs_mode in ("tile", "sip"):
        wcs_arg = wcs
    elif wcs_mode == "per_source":
        wcs_arg = [c.wcs for c in cutouts]
    elif wcs_mode == "headers":
        wcs_arg = [c.wcs.to_header() for c in cutouts[:-1]] + [None]
    elif wcs_mode == "clashing":
        wcs_arg = [c.wcs.to_header() for c in cutouts]
        wcs_arg[1]["BUNIT"] = "adu"
        wcs_arg[2]["EXTNAME"] = "OTHER"
        wcs_arg[3]["SRCID"] = "other"
    else:
        wcs_arg = None
    ids = ["src/1", "M31 ★ Andromède " + "x" * 70, "a" * 60, "trail "]
    tiles = [f"/tiles/{'deep/' * k * 9}T1_{k}.fits" for k in range(bands)]
    args = (job, ids, [150.1, -0.0, 359.99999999999, 1e-300], [2.2, -90.0, 90.0, 0.5],
            tiles, wcs_arg, fits_filenames(ids))
    extra = {"BUNIT": "Jy", "MAGZERO": (23.9, "zero point"), "LONGTEXT": "y" * 90}
    fast = FitsWriter(tmp_path / "fast", [f"b{k}" for k in range(bands)])
    built = []  # HDU lists astropy builds: the layout's, and the clashing files'
    real = FitsWriter._source_hdul
    monkeypatch.setattr(FitsWriter, "_source_hdul",
                        lambda self, *a: built.append(1) or real(self, *a))
    fast.write_sources(*args, header=extra)
    assert len(built) == (4 if wcs_mode == "clashing" else 1)
    monkeypatch.setattr(FitsWriter, "_source_hdul", real)
    monkeypatch.setattr(fits_io._Layout, "make", classmethod(lambda *a: None))
    slow = FitsWriter(tmp_path / "slow", [f"b{k}" for k in range(bands)])
    slow.write_sources(*args, header=extra)
    for name in fits_filenames(ids):
        assert (tmp_path / "fast" / name).read_bytes() == (
            tmp_path / "slow" / name
        ).read_bytes(), name
        with fits.open(tmp_path / "fast" / name) as hdul:
            hdul.verify("exception")
