# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Source catalogues: read any table astropy reads, find the columns, validate.

`read_catalog` turns a catalogue file (CSV, ECSV, FITS table, Parquet,
VOTable) or an in-memory `~astropy.table.Table` or pandas ``DataFrame`` into a
`Catalog` of plain arrays: source id, RA, Dec, size, and optionally the tile
files of ESA Cutana's ``fits_file_paths`` column.

Validation never drops a row. Each invalid row keeps its place, gets the
status `~cutana.Status.BAD_ROW` and a message that names the file, the row,
the column and the offending value. Only problems with the catalogue as a
whole (missing or unreadable file, no RA or Dec column, no size anywhere)
raise `~cutana.exceptions.CatalogError`.

Row numbers are 0-based data rows: row 0 is the first source, whatever
header lines or comments precede it in the file.
"""

import ast
import csv
import difflib
import io
import logging
import numbers
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field

import numpy as np
from astropy import units as u
from astropy.table import Table, vstack

from .exceptions import CatalogError, ConfigError
from .status import Status

__all__ = [
    "COLUMN_ALIASES",
    "COLUMN_OPTIONS",
    "MAX_SIZE_ARCSEC",
    "MAX_SIZE_PIXEL",
    "Catalog",
    "read_catalog",
]

logger = logging.getLogger(__name__)

#: Accepted column names per role, compared case-insensitively, in order of
#: preference.
COLUMN_ALIASES = {
    "id": ("sourceid", "source_id", "object_id", "objectid", "id"),
    "ra": ("ra", "ra_deg", "right_ascension", "raj2000", "ra_j2000", "alpha_j2000"),
    "dec": (
        "dec",
        "dec_deg",
        "declination",
        "dej2000",
        "decj2000",
        "dec_j2000",
        "delta_j2000",
    ),
    "diameter_pixel": ("diameter_pixel",),
    "diameter_arcsec": ("diameter_arcsec",),
    "files": ("fits_file_paths",),
}

#: The keywords of `read_catalog` that name its columns where they are not
#: under the usual names (`COLUMN_ALIASES`).
COLUMN_OPTIONS = ("id_column", "ra_column", "dec_column")

#: Largest accepted cutout diameter in pixels.
MAX_SIZE_PIXEL = 100_000
#: Largest accepted cutout diameter in arcseconds (10 degrees).
MAX_SIZE_ARCSEC = 36_000

# reader formats by file-name ending (longest endings first)
_FORMATS = (
    (".fits.gz", "fits"),
    (".fit.gz", "fits"),
    (".fits", "fits"),
    (".fit", "fits"),
    (".fts", "fits"),
    (".ecsv", "ascii.ecsv"),
    (".csv", "ascii.csv"),
    (".parquet", "parquet"),
    (".pq", "parquet"),
    (".votable", "votable"),
    (".vot", "votable"),
    (".xml", "votable"),
)

# longest text of a fits_file_paths cell that is parsed as a Python literal
_MAX_LITERAL = 100_000
# a quote, blanks or none, a quote: where two string literals may touch
_QUOTE_QUOTE = re.compile(r"['\"]\s*['\"]")


# --------------------------------------------------------------------------
# the result
# --------------------------------------------------------------------------


@dataclass
class Catalog:
    """A validated source catalogue, one entry per input row.

    Attributes
    ----------
    source_id : `~numpy.ndarray` of str
        Source identifier per row (the row number as text when the catalogue
        has no id column; ``''`` where the id is missing). Ids are data and
        may contain any character; writers sanitise them for file names.
    ra, dec : `~numpy.ndarray` of float64
        Coordinates in degrees, RA wrapped into ``[0, 360)``; NaN where the
        value is invalid.
    size_pixel : `~numpy.ndarray` of float64
        Cutout diameter in pixels, NaN where not given (or invalid).
    size_arcsec : `~numpy.ndarray` of float64
        Cutout diameter in arcseconds, NaN where not given (or invalid).
        When a row has both, the pixel diameter takes precedence (see
        `Catalog.diameter_pixels`).
    fits_file_paths : list of tuple of str, or None
        Per row, the tile files of the source, one per band (ESA Cutana's
        ``fits_file_paths`` column; relative paths resolved against the
        catalogue's folder, or against the working directory when only
        there is such a file), or None when the catalogue has no such
        column.
        Rows whose cell is invalid hold an empty tuple.
    status : `~numpy.ndarray` of int16
        `~cutana.Status.OK` or `~cutana.Status.BAD_ROW` per row.
    messages : dict
        Row (int, 0-based) to a message naming the file, row, column and
        value of each problem of that row; only bad rows have an entry.
    source : str
        The catalogue file path, or ``'<Table>'`` / ``'<DataFrame>'``.
    columns : dict
        The columns actually used, by role (``'id'``, ``'ra'``, ``'dec'``,
        ``'diameter_pixel'``, ``'diameter_arcsec'``, ``'files'``).

    Examples
    --------
    A `Catalog` is made by `read_catalog`:

    >>> import tempfile
    >>> from cutana.bench.synthetic import make_demo_survey
    >>> from cutana.catalog import read_catalog
    >>> survey = make_demo_survey(tempfile.mkdtemp(), n_sources=40)
    >>> cat = read_catalog(survey.catalogue_path)
    >>> len(cat), int(cat.bad.sum()), len(cat.messages)
    (40, 1, 1)
    >>> cat.columns["id"], cat.columns["ra"], cat.columns["dec"]
    ('SourceID', 'RA', 'Dec')
    >>> cat.ra.dtype, cat.status.dtype
    (dtype('float64'), dtype('int16'))
    >>> len(cat.fits_file_paths[0])  # one tile file per band
    4
    >>> cat.diameter_pixels().shape
    (40,)
    """

    source_id: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    size_pixel: np.ndarray
    size_arcsec: np.ndarray
    fits_file_paths: list | None
    status: np.ndarray
    messages: dict
    source: str
    columns: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.source_id)

    @property
    def bad(self):
        """Boolean mask of the rows marked `~cutana.Status.BAD_ROW`."""
        return self.status == Status.BAD_ROW

    def diameter_pixels(self, pixel_scale_arcsec=None):
        """Return the cutout diameter of every row in pixels.

        Parameters
        ----------
        pixel_scale_arcsec : float or array-like, optional
            Pixel scale (arcsec per pixel), one value or one per row, used
            for rows whose size is given in arcseconds only.

        Returns
        -------
        diameter : `~numpy.ndarray` of float64
            ``size_pixel`` where given, else ``size_arcsec /
            pixel_scale_arcsec`` (NaN when no scale is given), NaN for rows
            without any size.
        """
        diameter = self.size_pixel.copy()
        if pixel_scale_arcsec is not None:
            scale = np.broadcast_to(
                np.asarray(pixel_scale_arcsec, dtype=np.float64), diameter.shape
            )
            use = ~np.isfinite(diameter)
            diameter[use] = self.size_arcsec[use] / scale[use]
        return diameter


# --------------------------------------------------------------------------
# reading tables
# --------------------------------------------------------------------------


class _Columns:
    """Uniform column access over an astropy Table, a DataFrame or Arrow."""

    def __init__(self, kind, obj, names, nrows):
        self.kind = kind
        self.obj = obj
        self.names = names
        self.nrows = nrows
        self.overrides = {}  # name -> values replacing the table's column
        self.malformed = {}  # row -> why it could not be read (CSV)

    def get(self, name):
        """Return ``(values, mask, unit)`` of column ``name``.

        ``values`` is a `~numpy.ndarray` (object, str, or numeric), ``mask``
        a boolean array of missing cells or None, ``unit`` an astropy unit or
        None.
        """
        if name in self.overrides:
            values = self.overrides[name]
            if isinstance(values, tuple):  # (values, mask)
                return values[0], values[1], None
            return values, None, None
        if self.kind == "table":
            col = self.obj[name]
            unit = getattr(col, "unit", None)
            if isinstance(col, u.Quantity):
                return np.asarray(col.value), None, unit
            mask = None
            if isinstance(col, np.ma.MaskedArray):
                mask = np.ma.getmaskarray(col)
                if not mask.any():
                    mask = None
            values = np.asarray(np.ma.getdata(col))
            if mask is not None and mask.ndim > 1:
                mask = mask.all(axis=tuple(range(1, mask.ndim)))
            return values, mask, unit
        if self.kind == "arrow":
            col = self.obj.column(name)
            mask = np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
            kind = _exact_kind(col.type) if mask.any() else ""
            if kind:
                # pyarrow gives integers with nulls as float64, which rounds
                # ids beyond 2**53 (Euclid's OBJECT_IDs): fill them instead
                col = col.fill_null(False if kind == "b" else 0)
            values = np.asarray(col.to_numpy(zero_copy_only=False))
            return values, (mask if mask.any() else None), None
        # pandas DataFrame: positional access, the name may be any hashable
        series = self.obj.iloc[:, self.names.index(name)]
        mask = np.asarray(series.isna().to_numpy(), dtype=bool)
        numpy_dtype = getattr(series.dtype, "numpy_dtype", None)
        if mask.any() and numpy_dtype is not None and numpy_dtype.kind in "iub":
            # a nullable integer column (Int64, ...): not through float64
            values = series.to_numpy(dtype=numpy_dtype, na_value=numpy_dtype.type(0))
        else:
            values = series.to_numpy()
        return values, (mask if mask.any() else None), None


def _exact_kind(arrow_type):
    """``'i'``, ``'u'`` or ``'b'`` for Arrow integer and boolean types, else ''."""
    import pyarrow as pa

    if pa.types.is_signed_integer(arrow_type):
        return "i"
    if pa.types.is_unsigned_integer(arrow_type):
        return "u"
    if pa.types.is_boolean(arrow_type):
        return "b"
    return ""


def _format_of(path):
    """Reader format for ``path`` from its name, or None to let astropy guess."""
    lower = path.lower()
    for ending, fmt in _FORMATS:
        if lower.endswith(ending):
            return fmt
    return None


def _starts_with_comment(path):
    """True if the first non-blank line of a text file starts with ``#``."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            for line in f:
                if line.strip():
                    return line.lstrip().startswith("#")
    except OSError:
        return False
    return False


def _holds(path, *marks, block=1 << 24):
    """Which of the bytes ``marks`` a file holds (e.g. NUL, where the fast CSV
    reader cuts text, and a quote), as a set, whether it holds an odd
    number of quotes (``"``), and how many line ends, found in one pass."""
    found = set()
    quotes = lines = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(block):
                found.update(m for m in marks if m in chunk)
                quotes += chunk.count(b'"')
                lines += chunk.count(b"\n")
    except OSError:
        pass
    return found, quotes % 2 == 1, lines


def _check_quotes_closed(path, comments):
    """Raise `CatalogError` naming the line of a CSV file where a quoted
    field opens that no quote closes: every line after it would be read
    into that one field, and those rows lost without a word (astropy reads
    the file so). Called for a file with an odd number of quotes, or with
    fewer rows than lines (a quote inside an unquoted field, or in a
    comment line, is fine). A quoted field of more than the `csv` module's
    131,072 characters is taken for one that no quote closes."""
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            lines = (
                "\n" if comments and _is_comment(line) else line for line in f
            )
            reader = csv.reader(lines, skipinitialspace=True, strict=True)
            done = 0  # the last line of the last whole row
            try:
                for _ in reader:
                    done = reader.line_num
            except csv.Error as exc:
                text = str(exc)
                if "unexpected end of data" in text:
                    why = "that no quote closes"
                elif "field larger than field limit" in text:
                    limit = csv.field_size_limit()
                    why = f"that no quote closes within {limit:,} characters"
                else:
                    return
                msg = (
                    f"catalogue {path!r} line {done + 1}: a quote (\") opens a "
                    f"field there {why}, so that the lines after it would be "
                    "read into that field; close it, or remove it"
                )
                raise CatalogError(msg) from None
    except OSError:
        return


#: A CSV file of more than `_CSV_PARTS` times this many bytes (without a
#: file-list column) is read by astropy in parts of about this size.
_CSV_PART_BYTES = 8 * 2**20
_CSV_PARTS = 4


#: Seconds of reading a catalogue file after which `read_catalog` shows its
#: progress bar, when asked to.
READ_PROGRESS_DELAY = 1.0


class _Progress:
    """A progress bar (tqdm) over the bytes of a CSV catalogue, shown once
    reading it takes longer than `READ_PROGRESS_DELAY`; without ``path``
    (not asked for, or not a file) it does nothing."""

    def __init__(self, path=None):
        self.bar = None
        if path is not None:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=os.path.getsize(path), unit="B", unit_scale=True,
                desc="reading catalogue", delay=READ_PROGRESS_DELAY, leave=False,
            )

    def at(self, position):
        """The file has been read up to byte ``position``."""
        if self.bar is not None:
            self.bar.update(max(0, min(position, self.bar.total) - self.bar.n))

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _read_csv_parts(path, kwargs, quoted, progress=None):
    """Read a large CSV file with astropy in parts, or None (then read it whole).

    astropy's tokenizer and its columns hold several times the text while it
    reads: a CSV of 2,000,000 rows (116 MB) read at once peaked at 720 MB
    beyond the interpreter, in parts of 8 MB at 400 MB. astropy reads the
    parts (``fast_reader={'chunk_size': ..., 'chunk_generator': True}``),
    which are then stacked. A file with a quote (``quoted``) is read whole,
    as a quoted line break could fall at a part's end; so are parts that do
    not stack as one read would type them (numbers in one part, text in
    another).
    """
    try:
        if quoted or os.path.getsize(path) <= _CSV_PARTS * _CSV_PART_BYTES:
            return None
        from astropy.io import ascii

        options = {k: v for k, v in kwargs.items() if k != "format"}
        if "comment" in options:  # astropy's C reader takes no regex
            with open(path, "rb") as f:
                if f.read(3) == b"\xef\xbb\xbf":
                    return None
            options["comment"] = "#"  # also after blanks, as the regex
        parts = []
        for part in ascii.read(
            path, format="csv", guess=False,
            fast_reader={"chunk_size": _CSV_PART_BYTES, "chunk_generator": True},
            **options,
        ):  # fmt: skip
            parts.append(part)
            if progress is not None:
                progress.at(len(parts) * _CSV_PART_BYTES)
        return _stacked([p for p in parts if len(p)] or parts[:1])  # (types of no rows)
    except Exception:  # noqa: BLE001 - read whole: astropy explains what is wrong
        logger.debug("catalogue %s: not read in parts", path, exc_info=True)
        return None


def _csv_header(path):
    """The column names of a CSV file's header line (best effort)."""
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            for line in f:
                if line.strip() and not line.lstrip().startswith("#"):
                    row = next(csv.reader([line], skipinitialspace=True))
                    return [name.strip() for name in row]
    except OSError:
        return []
    return []


def _int_text_is_exact(path, first_column):
    """True if no CSV field of ``path`` looks like ``007``, ``-01`` or ``+5``.

    Such fields change when parsed as integers. The scan is vectorised over
    blocks of the file; with ``first_column`` only the first field of each
    line is looked at.
    """
    seps = (10,) if first_column else (10, 44)  # newline, comma
    tail = b"\n"
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 24)
            block = tail + chunk
            cut = block.rfind(b"\n") + 1 if chunk else len(block)
            tail = block[max(cut - 1, 0) :]  # keep the newline before the tail
            a = np.frombuffer(block, dtype=np.uint8, count=cut)
            if len(a):
                is_sep = a == seps[0]
                for sep in seps[1:]:
                    is_sep |= a == sep
                starts = np.flatnonzero(is_sep[:-1]) + 1
                for _ in range(3):  # skip a quote, blanks and a minus sign
                    c = a[starts]
                    if (c == 43).any():  # '+'
                        return False
                    starts = starts + ((c == 34) | (c == 32) | (c == 9) | (c == 45))
                    starts = starts[starts < len(a) - 1]
                c, nxt = a[starts], a[starts + 1]
                if ((c == 48) & (nxt >= 48) & (nxt <= 57)).any():
                    return False
            if not chunk:
                return True


def _csv_column(path, name, comments):
    """The stripped cells of column ``name`` of a CSV file, read with `csv`.

    Blank lines (and, with ``comments``, lines starting with ``#``) are
    skipped as astropy skips them. None if the header does not name the
    column exactly once or the file cannot be read.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            rows = _csv_rows(f, comments)
            header = [h.strip() for h in next(rows, [])]
            if header.count(name) != 1:
                return None
            j = header.index(name)
            return [row[j].strip() if len(row) > j else "" for row in rows]
    except (OSError, csv.Error):
        return None


def _csv_rows(f, comments):
    """The rows of an open CSV file, without blank (and comment) lines.

    As astropy's reader, a comment is a line that starts with ``#`` (after
    blanks), whatever follows, and a field may start with blanks before its
    quote (``1, "a, b"``).
    """
    lines = (line for line in f if not _is_comment(line)) if comments else f
    for row in csv.reader(lines, skipinitialspace=True):
        if not _blank(row):
            yield row


def _is_comment(line):
    """Whether a line of text is a comment line (starts with ``#``)."""
    return line.lstrip().startswith("#")


def _blank(row):
    """Whether a parsed CSV row is blank (astropy skips it)."""
    return not row or (len(row) == 1 and not row[0].strip())


def _blank_long_rows(path, comments):
    """A copy of a CSV file with its rows of more fields than the header
    blank, and why each was blanked (data row -> text); None if it has no
    such row, or more of them than of other rows (a header that lacks a
    name, say: the file as a whole is then reported).

    astropy's reader refuses a whole file for one such row (a comma too
    many, a field not quoted); the other rows are read as before, in their
    places. The copy is a temporary file the caller removes.
    """
    malformed, n_rows = {}, 0
    try:
        copy = tempfile.NamedTemporaryFile(  # noqa: SIM115 - removed below or by the caller
            "w", suffix=".csv", newline="", encoding="utf-8", delete=False
        )
    except OSError:
        return None
    try:
        with copy, open(path, newline="", encoding="utf-8-sig", errors="strict") as f:
            rows = _csv_rows(f, comments)
            header = next(rows, None)
            n = len(header or ())
            writer = csv.writer(copy, lineterminator="\n")
            writer.writerow(header or ())
            for i, row in enumerate(rows):
                n_rows += 1
                if len(row) > n:
                    text = ",".join(row)
                    text = text if len(text) <= 80 else text[:77] + "..."
                    malformed[i] = (
                        f"has {len(row)} fields where the header names {n} "
                        f"columns, so it is not read: {text!r}"
                    )
                    row = [""] * n
                writer.writerow(row)
    except (OSError, csv.Error, UnicodeError):
        malformed = {}
    if not malformed or 2 * len(malformed) > n_rows:
        os.unlink(copy.name)
        return None
    return copy.name, malformed


def _csv_text_column(path, name, nrows, kind, comments):
    """Column ``name`` of a CSV file as text, or None to keep the parsed values.

    The fast CSV reader turns the id ``007`` into the integer 7; ids must
    stay as written, so a numeric id column is re-read as text with the
    `csv` module unless a quick scan shows that no field can have changed.
    """
    try:
        header = _csv_header(path)
        if kind in "iu" and _int_text_is_exact(path, header[:1] == [name]):
            return None
    except OSError:
        return None
    values = _csv_column(path, name, comments)
    if values is None or len(values) != nrows:
        logger.debug("CSV rows of %s do not line up; keeping parsed ids", path)
        return None
    return np.array(values, dtype=str) if values else np.zeros(0, dtype="<U1")


@dataclass
class _SplitCSV:
    """A CSV file without one column (as lines), and that column's cells."""

    lines: list  # the CSV lines without the column (those `_Parts` left)
    cells: np.ndarray  # object array of str; equal cells share one string
    missing: np.ndarray | None  # empty cells, as astropy's reader masks them
    index: int  # position of the column in the header


def _split_csv(path, name, comments, reader=None):
    """Split column ``name`` off a CSV file, or None.

    A last column (ESA Cutana's file lists) is split by `_split_last`; the
    `csv` module reads the file when that cannot, or when the column is not
    the last.
    With a ``reader`` (`_Parts`), astropy reads the other columns part by part
    while the file is split, so that the lines of a large catalogue are
    never all held at once; the lines left are returned.
    None when the header does not name the column exactly once, or the file
    is not plain UTF-8 or cannot be parsed (astropy then reads the file
    whole and reports what is wrong with it).
    """
    for fast in (True, False):
        shared = {}
        cells = []
        lines = []
        if reader is not None:
            reader.clear()
        writer = csv.writer(_LineWriter(lines), lineterminator="\n")
        try:
            with open(path, newline="", encoding="utf-8-sig", errors="strict") as f:
                if reader is not None:
                    reader.file = f
                rows = _csv_rows(f, comments)
                row = next(rows, [])
                header = [h.strip() for h in row]
                if header.count(name) != 1:
                    return None
                j = header.index(name)
                writer.writerow(row[:j] + row[j + 1 :])
                if fast:
                    if j == 0 or j != len(row) - 1:
                        continue
                    if not _split_last(f, j, comments, lines, cells, shared, reader):
                        continue  # a line it cannot split alone: the csv module
                    break
                for row in rows:
                    cell = row[j].strip() if len(row) > j else ""
                    cells.append(shared.setdefault(cell, cell))
                    writer.writerow(row[:j] + row[j + 1 :])
                    if reader is not None:
                        reader.take(lines)
        except (OSError, csv.Error, UnicodeError):
            return None
    if reader is not None and reader.failed:
        return None
    values = np.empty(len(cells), dtype=object)
    values[:] = cells
    missing = values == ""
    return _SplitCSV(lines, values, missing if missing.any() else None, j)


def _split_last(f, j, comments, lines, cells, shared, reader=None):
    """`_split_csv` of the lines after the header when the column is the last.

    The file is read in blocks of whole lines (`_SPLIT_BLOCK_CHARS`). A
    block of plain lines is split with numpy (`_split_block`); the lines of
    any other block are split one by one (`_split_lines`). Returns False,
    with the lists half filled, at a line that cannot be parsed alone (a
    quoted field going on to the next line). A ``reader`` (`_Parts`) is
    handed the lines after each block. `read_catalog` of an ESA
    Cutana-style CSV of 50,000 rows (one tile file per row) took 0.15-0.17 s
    line by line and 0.09 s by blocks; one of 2,000,000 rows, 6.9 and 5.9 s.
    """
    seen = {}  # raw cell -> its value: file lists repeat from row to row
    while block := f.read(_SPLIT_BLOCK_CHARS):
        if block[-1] != "\n":
            block += f.readline()  # the rest of the last line
        split = _split_block(block, j, comments, seen, shared)
        if split is not None:
            lines += split[0]
            cells += split[1]
        elif not _split_lines(
            io.StringIO(block, newline=""), j, comments, lines, cells, shared, seen
        ):
            return False
        if reader is not None:
            reader.take(lines)
    return True


#: Characters of a CSV file that `_split_last` reads and splits at once.
_SPLIT_BLOCK_CHARS = 1 << 22


def _split_block(text, j, comments, seen, shared):
    """The lines without their last field and the last fields' values of a
    block of whole CSV lines, split at each line's ``j``-th comma with
    numpy; None unless every line is as plain as `_split_lines` splits
    without the `csv` module: ASCII, no lone carriage return, ``j`` commas
    or more, a non-empty text before the ``j``-th that holds no quote and
    no ``", "`` and does not start with a blank (and no ``#`` in the block
    where comments are skipped), and a last field that is unquoted without
    a comma, or quoted whole. The values are those `_split_lines` gives.
    """
    if not text.isascii():
        return None
    a = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    ends = np.flatnonzero(a == 10)  # (each line's own end, before "\r\n")
    if a[-1] != 10:  # the file's last line, without a line break
        ends = np.append(ends, len(a))
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    cr = np.zeros(len(ends), dtype=bool)
    cr[ends > starts] = a[ends[ends > starts] - 1] == 13
    ends -= cr
    if np.count_nonzero(a == 13) != np.count_nonzero(cr):
        return None  # a line broken by a lone carriage return
    commas = np.flatnonzero(a == 44)
    k = np.searchsorted(commas, starts) + (j - 1)
    if len(commas) == 0 or k[-1] >= len(commas):
        return None
    cut = commas[k]
    if (cut >= ends).any() or (cut == starts).any() or (a[starts] == 32).any():
        return None  # too few fields, an empty prefix, or a blank at its start

    def within(positions):  # whether a line has one of positions before its cut
        found = np.searchsorted(positions, cut) - np.searchsorted(positions, starts)
        return found.any()

    inner = commas[commas + 1 < len(a)]
    blank_after = inner[a[inner + 1] == 32]
    if within(np.flatnonzero(a == 34)) or within(blank_after):
        return None  # a quote, or ", ", before the cut
    if comments and (a == 35).any():
        return None
    cut = cut.tolist()
    raws = [text[q + 1 : e] for q, e in zip(cut, ends.tolist(), strict=True)]
    values = [seen.get(raw) for raw in raws]
    for i, raw in enumerate(raws):
        if values[i] is None:
            cell = _plain_cell(raw)
            if cell is None:
                return None
            values[i] = seen[raw] = shared.setdefault(cell, cell)
    lines = [text[s:q] + "\n" for s, q in zip(starts.tolist(), cut, strict=True)]
    return lines, values


def _plain_cell(raw):
    """The value of a last CSV field as the `csv` module reads it when it is
    unquoted without a comma or quote, or quoted whole (after blanks, as in
    astropy), stripped; None for any other field."""
    quoted = raw.lstrip(" ")
    if '"' not in raw and "," not in raw:
        return raw.strip()
    if (
        quoted[:1] == quoted[-1:] == '"'
        and len(quoted) > 1
        and '"' not in quoted[1:-1].replace('""', "")
    ):
        return quoted[1:-1].replace('""', '"').strip()
    return None


def _split_lines(f, j, comments, lines, cells, shared, seen):
    """`_split_last` of the lines of ``f`` one by one.

    Each line is split at its ``j``-th comma with `str.split`, which is
    several times faster than the `csv` module, when the fields before hold
    no quote and start with no blank (a quoted file list, the usual
    multi-band cell, is unquoted here as the `csv` module does, also after
    blanks); other lines are parsed alone with the `csv` module. Returns
    False at a line that cannot be parsed alone (a quoted field going on to
    the next line). A cell seen before (in ``seen``) is looked up, not
    checked and unquoted again.
    """
    writer = csv.writer(_LineWriter(lines), lineterminator="\n")
    for line in f:
        text = line.rstrip("\r\n")
        parts = text.split(",", j)
        raw = parts[-1]
        prefix = text[: len(text) - len(raw) - 1]
        # the prefix is kept as it is when the csv module would write it
        # back the same: no quote, and no field starting with a blank
        plain = (
            prefix and '"' not in prefix and prefix[:1] != " " and ", " not in prefix
        )
        cell = seen.get(raw) if len(parts) > j else None
        if cell is None and len(parts) > j and plain:
            cell = _plain_cell(raw)
            if cell is not None:
                cell = seen[raw] = shared.setdefault(cell, cell)
        if cell is not None and plain:
            if not (comments and _is_comment(prefix)):
                cells.append(cell)
                lines.append(prefix + "\n")
            continue
        if comments and _is_comment(line):
            continue  # as astropy: the line, not its first field ('"#a",...')
        row = next(csv.reader([line], skipinitialspace=True), [])
        if any("\n" in v or "\r" in v for v in row):
            return False  # a quoted field goes on
        if _blank(row):
            continue
        cell = row[j].strip() if len(row) > j else ""
        cells.append(shared.setdefault(cell, cell))
        writer.writerow(row[:j] + row[j + 1 :])
    return True


class _LineWriter:
    """A file-like ``write`` that appends each line written to a list."""

    def __init__(self, lines):
        self.write = lines.append


def _stacked(tables):
    """The tables read of the parts of one CSV file, as one table (astropy's
    `~astropy.table.vstack`, which refuses columns typed otherwise)."""
    if len(tables) == 1:
        return tables[0]
    return vstack(tables, join_type="exact", metadata_conflicts="silent")


#: Lines of a split CSV that astropy reads at once (`_Parts`).
_SPLIT_LINES = 500_000


class _Parts:
    """The rest of a split CSV, read by astropy `_SPLIT_LINES` lines at a time.

    astropy's tokenizer and its columns hold several times the text while
    it reads, so that one read of 2,000,000 lines took 700 MB beyond them;
    parts are read while the file is split (`_split_csv`), so that only a
    part's lines are held at once, then stacked (`stack`).
    """

    def __init__(self, progress=None):
        self.progress = progress  # a `_Progress`, or None
        self.file = None  # the text file being split, for its position
        self.clear()

    def clear(self):
        self.tables = []
        self.failed = False
        self.several = False  # whether more than one part was read

    def take(self, lines):
        """Read whole parts of ``lines`` (the header first) and drop them."""
        if len(lines) - 1 >= _SPLIT_LINES and self.progress and self.file:
            self.progress.at(self.file.buffer.tell())
        while len(lines) - 1 >= _SPLIT_LINES and not self.failed:
            try:
                self.tables.append(
                    Table.read(lines[: _SPLIT_LINES + 1], format="ascii.csv")
                )
            except Exception:  # noqa: BLE001 - astropy reads the file whole and explains
                self.failed = True
            del lines[1 : _SPLIT_LINES + 1]

    def stack(self, split):
        """The table of all parts and the lines left, or None if not lined up.

        Parts whose columns do not stack as one read would type them (a
        column of numbers in one part, of text in another) give None too:
        the file is then split again and read at once.
        """
        try:
            if len(split.lines) > 1 or not self.tables:
                self.tables.append(Table.read(split.lines, format="ascii.csv"))
            split.lines = None
            self.several = len(self.tables) > 1
            table = _stacked(self.tables)
        except Exception:  # noqa: BLE001 - numbers and text, or a line astropy refuses
            return None
        finally:
            self.tables = []
        if len(table) != len(split.cells):
            logger.debug("CSV rows do not line up after splitting")
            return None
        return table


def _read_split(path, name, comments, progress=None):
    """Split column ``name`` off a CSV file and read the rest with astropy.

    Returns ``(split, table)``, or None when the file is not split (see
    `_split_csv`) or does not line up (astropy then reads it whole and
    explains). More than `_SPLIT_LINES` lines are read in parts (`_Parts`);
    parts that do not stack are read again at once.
    """
    reader = _Parts(progress)
    split = _split_csv(path, name, comments, reader)
    if split is None:
        return None
    table = reader.stack(split)
    if table is None and reader.several:
        split = _split_csv(path, name, comments)  # again, all lines held
        table = _Parts().stack(split) if split else None
    return None if table is None else (split, table)


def _read_parquet(path):
    """Read a Parquet file with pyarrow (list cells and strings kept intact).

    A file astropy wrote (``Table.write(..., format='parquet')``) keeps
    masks in extra ``<name>.mask`` columns and units in its metadata: it is
    read with astropy, which restores both.
    """
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        msg = (
            f"reading the Parquet catalogue {path!r} needs pyarrow: pip install pyarrow"
        )
        raise CatalogError(msg) from exc
    if b"table_meta_yaml" in (pq.read_schema(path).metadata or {}):
        table = Table.read(path, format="parquet")
        return _Columns("table", table, list(table.colnames), len(table))
    table = pq.read_table(path)
    return _Columns(
        "arrow", table, [str(n) for n in table.column_names], table.num_rows
    )


def _load(catalog, id_column, _rewritten=False, progress=False):
    """Open ``catalog`` as `_Columns`; return ``(columns, source, label, folder)``.

    With ``progress``, a progress bar over a CSV file's bytes (`_Progress`).

    A CSV file that astropy refuses for rows with more fields than its
    header is read again with those rows blank (`_blank_long_rows`); they
    are in ``columns.malformed``.
    """
    if isinstance(catalog, Table):
        cols = _Columns("table", catalog, list(catalog.colnames), len(catalog))
        return cols, "<Table>", "<Table>", None
    if hasattr(catalog, "iloc") and hasattr(catalog, "columns"):
        names = [str(c) for c in catalog.columns]
        cols = _Columns("pandas", catalog, names, len(catalog))
        return cols, "<DataFrame>", "<DataFrame>", None
    if not isinstance(catalog, str | os.PathLike):
        msg = (
            "catalog must be a file path, an astropy Table or a pandas DataFrame, "
            f"got {type(catalog).__name__}"
        )
        raise TypeError(msg)

    path = os.fspath(catalog)
    label = os.path.basename(path) or path
    if not os.path.exists(path):
        msg = f"catalogue file {path!r} does not exist"
        raise CatalogError(msg)
    if os.path.isdir(path):
        msg = f"catalogue {path!r} is a folder, not a table file"
        raise CatalogError(msg)
    fmt = _format_of(path)
    bar = _Progress(path if progress and fmt == "ascii.csv" else None)
    try:
        if fmt == "parquet":
            cols = _read_parquet(path)
        else:
            kwargs = {} if fmt is None else {"format": fmt}
            if fmt == "ascii.csv" and _starts_with_comment(path):
                kwargs["comment"] = r"\ufeff?\s*#"  # the first line may hold a BOM
            # one pass over the file for the bytes that change how it is read
            marks, odd, n_lines = (
                _holds(path, b"\0", b'"') if fmt == "ascii.csv" else ((), 0, 0)
            )
            if odd:
                _check_quotes_closed(path, "comment" in kwargs)
            if b"\0" in marks:
                # astropy's C reader ends a field at NUL ('a\0b' -> 'a'),
                # which would merge distinct ids; the Python reader keeps it
                kwargs["fast_reader"] = False
            # reader warnings (e.g. a value too large for a float, read as
            # inf) are about values that row validation reports anyway
            # ESA Cutana's file lists are long, repeated strings: they are
            # split off with the csv module into shared Python strings, and
            # astropy reads the rest (a fixed-width text column of them, and
            # its tokenizer, would hold several times the file in memory)
            lists = COLUMN_ALIASES["files"][0] if fmt == "ascii.csv" else None
            split = None
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                table = None
                if lists and "fast_reader" not in kwargs:
                    read = _read_split(path, lists, "comment" in kwargs, bar)
                    if read is not None:
                        split, table = read
                if table is None and fmt == "ascii.csv" and "fast_reader" not in kwargs:
                    table = _read_csv_parts(path, kwargs, b'"' in marks, bar)
                if table is None:  # not split, or astropy read it otherwise
                    table = Table.read(path, **kwargs)
            for w in caught:
                logger.info("catalogue %s: %s", path, w.message)
            for name in list(table.colnames):
                if name.startswith("\ufeff"):  # byte-order mark of the first column
                    table.rename_column(name, name.lstrip("\ufeff"))
            if b'"' in marks and not odd and len(table) + 1 < n_lines:
                # lines read into fewer rows: a quoted field over several
                # lines, blank lines, or an unclosed quote beside a stray one
                _check_quotes_closed(path, "comment" in kwargs)
            cols = _Columns("table", table, list(table.colnames), len(table))
            if split is not None:
                cols.names.insert(split.index, lists)
                cols.overrides[lists] = (split.cells, split.missing)
    except CatalogError:
        raise
    except Exception as exc:  # any reader failure is a file-level problem
        if fmt == "ascii.csv" and not _rewritten:
            blanked = _blank_long_rows(path, _starts_with_comment(path))
            if blanked is not None:
                copy, malformed = blanked
                try:
                    cols = _load(copy, id_column, _rewritten=True)[0]
                except CatalogError:
                    cols = None  # refused for more than those rows: as it was
                finally:
                    os.unlink(copy)
                if cols is not None:
                    cols.malformed = malformed
                    return cols, path, label, os.path.dirname(os.path.abspath(path))
        how = f"as {fmt}" if fmt else "in any format astropy knows"
        reason = " ".join(str(exc).split())
        if fmt is None and "could not be identified" in reason:
            # astropy's message goes on with its table of every format
            endings = ", ".join(e for e, _ in _FORMATS if e.count(".") == 1)
            reason = f"its format could not be identified; name it {endings}"
            msg = f"cannot read catalogue {path!r}: {reason}"
        else:
            kind = type(exc).__name__
            msg = f"cannot read catalogue {path!r} {how}: {kind}: {reason}"
        raise CatalogError(msg) from exc
    finally:
        bar.close()

    if fmt == "ascii.csv":
        # keep ids exactly as written (leading zeros, signs) when the fast
        # reader parsed them as numbers
        name = _resolve(cols.names, "id", id_column, path, required=False)
        if name is not None:
            values, _, _ = cols.get(name)
            if values.dtype.kind in "iuf":
                text = _csv_text_column(
                    path,
                    name,
                    cols.nrows,
                    values.dtype.kind,
                    _starts_with_comment(path),
                )
                if text is not None:
                    cols.overrides[name] = text
    return cols, path, label, os.path.dirname(os.path.abspath(path))


# --------------------------------------------------------------------------
# column lookup
# --------------------------------------------------------------------------


def _closest(names, candidates):
    """The name in ``names`` most similar to any of ``candidates``, or None."""
    best, best_ratio = None, 0.0
    for name in names:
        for cand in candidates:
            ratio = difflib.SequenceMatcher(None, name.lower(), cand.lower()).ratio()
            if ratio > best_ratio:
                best, best_ratio = name, ratio
    return best if best_ratio >= 0.6 else None


def _skycoord_column(cols, ra_column, dec_column, source):
    """The positions of a `~astropy.coordinates.SkyCoord` column of an
    astropy table, as ICRS ``<name>.ra`` and ``<name>.dec`` columns of
    ``cols`` (``cols.overrides``); returns their names, or ``(None, None)``.

    The column is the one ``ra_column`` names, else the table's only
    SkyCoord column when the table has no RA or Dec column of its own (an
    ECSV, FITS or Parquet table written from one with a SkyCoord column is
    read back with it). Coordinates in another frame are transformed to
    ICRS.
    """
    if cols.kind != "table":
        return None, None
    coords = sys.modules.get("astropy.coordinates")
    if coords is None:  # (never imported: no SkyCoord column can exist)
        return None, None
    table = cols.obj  # (without a split-off column that `cols.names` lists)
    sky = [n for n in table.colnames if isinstance(table[n], coords.SkyCoord)]
    if ra_column is not None:
        if ra_column not in sky:
            return None, None
        name = ra_column
    else:
        if not sky:
            return None, None
        lower = {n.lower().strip() for n in cols.names}
        aliases = (*COLUMN_ALIASES["ra"], *COLUMN_ALIASES["dec"])
        if dec_column is not None or not lower.isdisjoint(aliases):
            return None, None  # the table names its RA and Dec (or tries to)
        if len(sky) > 1:
            msg = (
                f"catalogue {source!r} has no RA or Dec column but "
                f"{len(sky)} SkyCoord columns ({', '.join(map(repr, sky))}): pass "
                "ra_column=NAME (--ra-column NAME on the command line) to choose one"
            )
            raise CatalogError(msg)
        name = sky[0]
    try:
        icrs = table[name].icrs
    except Exception as exc:  # noqa: BLE001 - astropy says what the frame lacks
        msg = (
            f"catalogue {source!r}: the positions of SkyCoord column {name!r} "
            f"cannot be transformed to ICRS: {exc}"
        )
        raise CatalogError(msg) from exc
    ra_name, dec_name = f"{name}.ra", f"{name}.dec"
    cols.overrides[ra_name] = np.atleast_1d(icrs.ra.deg).astype(np.float64)
    cols.overrides[dec_name] = np.atleast_1d(icrs.dec.deg).astype(np.float64)
    logger.debug("catalogue %s: positions from SkyCoord column %r", source, name)
    return ra_name, dec_name


def _resolve(names, role, override, source, *, required, keyword=None):
    """Find the column of ``role`` among ``names``; raise or return None."""
    keyword = keyword or f"{role}_column"
    if override is not None:
        if override in names:
            return override
        lower = {n.lower(): n for n in reversed(names)}
        if str(override).lower() in lower:
            return lower[str(override).lower()]
        hint = _closest(names, [str(override)])
        msg = (
            f"catalogue {source!r} has no column {override!r} (given as {keyword}); "
            f"columns present: {', '.join(map(repr, names)) or 'none'}"
        )
        if hint is not None:
            msg += f". Did you mean {hint!r}?"
        raise CatalogError(msg)
    lower = {}
    for n in names:
        lower.setdefault(n.lower().strip(), []).append(n)
    for alias in COLUMN_ALIASES[role]:
        if alias in lower:
            found = lower[alias]
            if len(found) > 1:  # 'RA' and 'ra': which one is meant?
                what = (
                    f"{len(found)} columns named {found[0]!r}; using the first "
                    "(rename the others to choose)"
                    if len(set(found)) < len(found)
                    else f"columns {' and '.join(map(repr, found))}, which differ "
                    f"only in case; using {found[0]!r} (pass {keyword}=NAME, or "
                    f"--{keyword.replace('_', '-')} NAME on the command line, to "
                    "choose)"
                )
                logger.warning("catalogue %r has %s", source, what)
            return found[0]
    if not required:
        return None
    hint = _closest(names, COLUMN_ALIASES[role])
    msg = (
        f"catalogue {source!r} has no {_ROLE_NAMES[role]} column "
        f"(looked for {', '.join(COLUMN_ALIASES[role])}, in any case); "
        f"columns present: {', '.join(map(repr, names)) or 'none'}"
    )
    flag = "--" + keyword.replace("_", "-")  # the option of `cutana run`
    if hint is not None:
        msg += (
            f". Did you mean {hint!r}? Pass {keyword}={hint!r} ({flag} {hint} on the "
            "command line) to use it"
        )
    else:
        msg += f". Pass {keyword}=NAME ({flag} NAME on the command line) to name it"
    raise CatalogError(msg)


# --------------------------------------------------------------------------
# value conversion
# --------------------------------------------------------------------------

_OK, _MISSING, _NOT_NUMBER = 0, 1, 2
_ROLE_NAMES = {"ra": "RA", "dec": "Dec", "id": "id", "files": "fits_file_paths"}


def _text(values):
    """A str array from a bytes, str or object array (None -> '')."""
    if values.dtype.kind == "S":
        return np.char.decode(values, "utf-8", errors="replace")
    if values.dtype.kind == "U":
        return values
    out = [
        ""
        if v is None
        else (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
        for v in values.tolist()
    ]
    return np.array(out, dtype=str) if out else np.zeros(0, dtype="<U1")


def _to_float(values, mask):
    """Convert a column to float64; return ``(floats, problem)``.

    ``problem`` is ``_OK``, ``_MISSING`` (masked, None or blank) or
    ``_NOT_NUMBER`` per row. Non-finite numbers are ``_OK`` here.
    """
    n = len(values)
    problem = np.zeros(n, dtype=np.int8)
    out = None
    if values.dtype.kind in "fiub":
        out = values.astype(np.float64)
    else:
        if values.dtype.kind == "S":
            values = np.char.decode(values, "utf-8", errors="replace")
        if values.dtype.kind == "U":
            try:
                out = values.astype(np.float64)
            except ValueError:
                out = None
        if out is None:
            out = np.full(n, np.nan)
            for i, v in enumerate(values.tolist()):
                if v is None or (isinstance(v, str) and not v.strip()):
                    problem[i] = _MISSING
                    continue
                try:
                    out[i] = float(v)
                except (TypeError, ValueError, OverflowError):
                    problem[i] = _NOT_NUMBER
    if mask is not None:
        problem[mask] = _MISSING
        out[mask] = np.nan
    return out, problem


#: A plain sexagesimal angle: ``[+-]D:M[:S]`` or ``[+-]D M S``, each field
#: a decimal number (`_sexagesimal` reads these itself; astropy the rest).
_PLAIN_SEXAGESIMAL = re.compile(
    r"\s*([+-]?)(\d+):(\d+(?:\.\d*)?)(?::(\d+(?:\.\d*)?))?\s*"
    r"|\s*([+-]?)(\d+) +(\d+) +(\d+(?:\.\d*)?)\s*"
)


def _sexagesimal(texts, unit):
    """Read text angles that are not plain numbers, in degrees.

    Parameters
    ----------
    texts : list of str
        Values such as ``'10:00:00.5'``, ``'-02 10 30'``, ``'10h00m00.5s'``
        or ``'150d30m'``.
    unit : `~astropy.units.Unit`
        What the first field is without a unit of its own (hours for RA,
        degrees for Dec, as `~astropy.coordinates.SkyCoord` reads them with
        ``unit=(u.hourangle, u.deg)``).

    Returns
    -------
    degrees : `~numpy.ndarray`
        The angles, NaN where a value is not an angle.
    reasons : dict
        Position -> why astropy could not read the value as an angle.

    Notes
    -----
    Plain ``D:M:S`` / ``D M S`` values (`_PLAIN_SEXAGESIMAL`) are summed
    here as `~astropy.coordinates.Angle` sums them (the magnitude of the
    first field plus the others over 60 and 3600, signed, then converted to
    degrees), giving the same float: astropy's parser takes about 60 µs a
    value, too slow for a whole catalogue. Values out of range and every
    other form go to `~astropy.coordinates.Angle`, which explains them.
    """
    from astropy.coordinates import Angle

    to_deg = float(u.Unit(unit).to(u.deg))
    hours = u.Unit(unit) == u.hourangle
    out = np.full(len(texts), np.nan)
    reasons = {}
    for i, text in enumerate(texts):
        m = _PLAIN_SEXAGESIMAL.fullmatch(text)
        if m is not None:
            g = m.groups()
            sign, d, mins, secs = g[:4] if g[1] is not None else g[4:]
            d, mins = float(d), float(mins)
            secs = 0.0 if secs is None else float(secs)
            if (d < 24.0 or not hours) and mins < 60.0 and secs < 60.0:
                value = d + mins / 60.0 + secs / 3600.0
                out[i] = (-value if sign == "-" else value) * to_deg
                continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # 24 h and 60 s: astropy's rounding
                out[i] = Angle(text, unit=unit).to_value(u.deg)
        except (ValueError, TypeError, u.UnitsError) as exc:
            reasons[i] = str(exc)
    return out, reasons


def _read_sexagesimal(raw, values, problem, unit, role):
    """Read the coordinates of ``raw`` that are not numbers as sexagesimal
    angles (`_sexagesimal`), into ``values`` (degrees) and ``problem``, in
    place.

    The first field is in the column's own angular unit, else in hours for
    RA and degrees for Dec. Returns row -> astropy's reason for the values
    that look like angles (a digit and ``:``, a blank or a unit letter)
    but are not.
    """
    rows = np.flatnonzero(problem == _NOT_NUMBER)
    if not len(rows):
        return {}
    default = u.hourangle if role == "ra" else u.deg
    if unit is not None:
        try:
            if u.Unit(unit).is_equivalent(u.deg):
                default = u.Unit(unit)
        except (ValueError, TypeError):
            pass
    texts = _text(np.asarray(raw)[rows]).tolist()  # (bytes of FITS tables too)
    degrees, reasons = _sexagesimal(texts, default)
    good = np.isfinite(degrees)
    values[rows[good]] = degrees[good]
    problem[rows[good]] = _OK
    hint = (
        "; a sexagesimal RA is read in hours: give degrees as a number or "
        "with a unit, 150d30m00s"
        if default == u.hourangle
        else ""
    )
    return {
        int(rows[k]): why.rstrip(".") + hint if "'hours'" in why else why
        for k, why in reasons.items()
        if _LOOKS_ANGULAR.search(texts[k])
    }


#: A value that looks like a sexagesimal angle or one with a unit.
_LOOKS_ANGULAR = re.compile(r"\d\s*[:\s°′″'\"hdms]")


def _angle_factor(unit, name, role, source):
    """Factor from the values of coordinate column ``name`` (``role``
    ``'ra'`` or ``'dec'``) with ``unit`` to degrees: 1 without a unit or
    with one astropy does not know (``'degrees'``, say: a warning says
    so); hours of RA (a time unit) are hour angles. Raises `CatalogError`
    for a unit of another kind (metres, pixels): the values are not
    angles."""
    if unit is None:
        return 1.0
    try:
        unit = u.Unit(unit, parse_strict="silent")
    except (ValueError, TypeError):
        unit = u.UnrecognizedUnit(str(unit))
    if isinstance(unit, u.UnrecognizedUnit):
        logger.warning(
            "catalogue %s column %r: astropy does not know its unit %r; its "
            "values are taken as degrees", source, name, unit.name,
        )
        return 1.0
    if unit == u.dimensionless_unscaled:
        return 1.0
    if unit.is_equivalent(u.deg):
        return float(unit.to(u.deg))
    if role == "ra" and unit.is_equivalent(u.h):
        return float(unit.to(u.h)) * 15.0
    msg = (
        f"catalogue {source!r} column {name!r}: its unit {unit} is not an angle "
        "(give RA and Dec in degrees, or with an angular unit)"
    )
    raise CatalogError(msg)


def _size_kind(unit, kind, name):
    """What a size column holds, ``'pixel'`` or ``'arcsec'``, and the factor
    from its values to that: its own unit when it is an angle or pixels
    (an ECSV, FITS or VOTable column's), else ``kind``, which its name says."""
    if unit is not None:
        try:
            unit = u.Unit(unit)
            if unit.is_equivalent(u.arcsec):
                return "arcsec", float(unit.to(u.arcsec))
            if unit.is_equivalent(u.pix):
                return "pixel", float(unit.to(u.pix))
        except (u.UnitsError, ValueError, TypeError):
            pass
        logger.debug("size column %r has unit %s; taken as %ss", name, unit, kind)
    return kind, 1.0


def _show(value, limit=60):
    """Short text of a cell value for a message."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, float | np.floating):
        return repr(float(value))
    if isinstance(value, np.integer):
        return repr(int(value))
    if isinstance(value, np.str_):
        value = str(value)
    if isinstance(value, np.ndarray):
        value = value.tolist()
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ids(values, mask):
    """Source ids as a str array and a boolean mask of missing ids."""
    if values.dtype.kind == "f":
        finite = np.isfinite(values)
        integral = finite & (values == np.round(values)) & (np.abs(values) < 2**63)
        out = values.astype(str)
        out[integral] = values[integral].astype(np.int64).astype(str)
        out[~finite] = ""
        text = out
    elif values.dtype.kind in "iub":
        text = values.astype(str)
    else:
        text = _text(values)
    if mask is not None:
        text = np.array(text, copy=True)
        text[mask] = ""
    if len(text) == 0:
        return text, np.zeros(0, dtype=bool)
    missing = np.strings.str_len(np.strings.strip(text)) == 0
    return text, missing


def _duplicates(ids, missing, block=1 << 20):
    """Rows whose id an earlier row has (missing ids aside), and that row.

    Returns a boolean array and, for the rows it flags, the first row of
    their id.

    The ids are sorted once (stably, so the first of equal ids is the
    earliest row) and compared in blocks: `numpy.unique` with its index and
    inverse held three copies of the ids at once, 250 MB for 2,000,000 ids
    of 12 characters.
    """
    n = len(ids)
    rows = np.flatnonzero(~missing) if missing.any() else None
    order = np.argsort(ids if rows is None else ids[rows], kind="stable")
    if rows is not None:
        order = rows[order]
    new = np.ones(len(order), dtype=bool)  # the first of its id in sorted order
    for lo in range(0, len(order) - 1, block):
        sorted_ids = ids[order[lo : lo + block + 1]]
        new[lo + 1 : lo + len(sorted_ids)] = sorted_ids[1:] != sorted_ids[:-1]
    dup = np.zeros(n, dtype=bool)
    first_of = np.full(n, -1, dtype=np.int64)
    if not new.all():
        first = order[new][np.cumsum(new) - 1]  # per sorted row, its id's first row
        first_of[order] = first
        dup[order] = first != order
    return dup, first_of


def _files_problem(value, masked):
    """What is wrong with a ``fits_file_paths`` cell `_parse_files` refused."""
    if masked or value is None:
        return "value is missing"
    if isinstance(value, str) and len(value.strip()) > _MAX_LITERAL:
        return (
            f"value of {len(value.strip()):,} characters is longer than a file "
            f"list may be ({_MAX_LITERAL:,})"
        )
    if isinstance(value, str) and _adjacent_strings(value.strip()):
        return (
            f"value {_show(value)} has no comma between its paths (as numpy "
            "prints an array); write a list such as ['a.fits', 'b.fits']"
        )
    return f"value {_show(value)} is not a file path or a list of file paths"


def _adjacent_strings(text):
    """Whether ``text`` holds two string literals with no comma between them,
    which Python (and so `ast.literal_eval`) joins into one: a file list
    printed by numpy, ``['a.fits' 'b.fits']``."""
    import io
    import tokenize

    if not _QUOTE_QUOTE.search(text):
        return False  # the usual cell: no quote followed by a quote
    try:
        tokens = [
            t for t in tokenize.generate_tokens(io.StringIO(text).readline)
            if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT)
        ]
    except (tokenize.TokenError, SyntaxError):
        return False
    kinds = [t.type for t in tokens]
    pairs = zip(kinds, kinds[1:], strict=False)
    return any(a == b == tokenize.STRING for a, b in pairs)


def _parse_files(value, folder, resolved=None):
    """One ``fits_file_paths`` cell as a tuple of paths, or None if invalid.

    ``resolved`` (a dict) keeps the relative paths already resolved.
    """
    if value is None:
        return None
    resolved = {} if resolved is None else resolved
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if text[0] in "[(":
            if len(text) > _MAX_LITERAL or _adjacent_strings(text):
                return None
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                return None
        else:
            value = [text]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not value:
        return None
    paths = []
    for p in value:
        if isinstance(p, bytes):
            p = p.decode("utf-8", "replace")
        if not isinstance(p, str) or not p.strip():
            return None
        p = p.strip()
        if folder is not None and "://" not in p:
            if p not in resolved:
                resolved[p] = _resolve_relative(os.path.expanduser(p), folder)
            p = resolved[p]
        paths.append(p)
    return tuple(paths)


def _resolve_relative(path, folder):
    """A relative tile path of a catalogue file, made absolute.

    Against the catalogue's folder; but when no file is there and one is
    at the path taken from the working directory, as ESA Cutana reads it,
    that one.
    """
    if os.path.isabs(path):
        return path
    beside = os.path.normpath(os.path.join(folder, path))
    if not os.path.exists(beside) and os.path.exists(path):
        return os.path.abspath(path)
    return beside


def _one_per_row(values, name, source):
    """Raise CatalogError if column ``name`` holds more than one value per row."""
    if values.ndim != 1:
        msg = (
            f"catalogue {source!r} column {name!r} holds {values.shape[1:]} values "
            "per row, expected one"
        )
        raise CatalogError(msg)


def _check_size_value(size):
    """Validate the global ``size`` option (pixels) and return it as float."""
    bad = isinstance(size, bool) or not isinstance(size, numbers.Real)
    if not bad:
        size = float(size)
        bad = not (
            np.isfinite(size) and 0 < size <= MAX_SIZE_PIXEL and np.round(size) >= 1
        )
    if bad:
        msg = (
            f"size must be a positive number of pixels (at least 1, at most "
            f"{MAX_SIZE_PIXEL}), got {size!r}"
        )
        raise ConfigError(msg)
    return size


# --------------------------------------------------------------------------
# the reader
# --------------------------------------------------------------------------


def read_catalog(
    catalog,
    *,
    size=None,
    id_column=None,
    ra_column=None,
    dec_column=None,
    size_column=None,
    files_column=None,
    progress=False,
) -> Catalog:
    """Read and validate a source catalogue.

    Parameters
    ----------
    catalog : str, `os.PathLike`, `~astropy.table.Table` or `pandas.DataFrame`
        A table file or an in-memory table. The file format follows the
        name: ``.csv``, ``.ecsv``, ``.fits``/``.fit`` (first table HDU),
        ``.parquet``/``.pq``, ``.vot``/``.xml`` (VOTable); other names are
        left to astropy's format guessing.
    size : float, optional
        One cutout diameter in pixels for all sources. It overrides any size
        column (size columns are then not read or validated).
    id_column, ra_column, dec_column : str, optional
        Column names to use instead of the aliases (matched exactly, then
        case-insensitively). Default aliases, case-insensitive:
        id ``SourceID``, ``source_id``, ``object_id``, ``objectid``, ``id``;
        RA ``RA``, ``ra_deg``, ``RIGHT_ASCENSION`` (and ``RAJ2000``,
        ``ALPHA_J2000``); Dec ``Dec``, ``dec_deg``, ``DECLINATION`` (and
        ``DEJ2000``, ``DELTA_J2000``). Without RA and Dec columns, an
        astropy table's only `~astropy.coordinates.SkyCoord` column gives
        the positions (in ICRS, from any frame astropy transforms);
        ``ra_column`` may name one of several.
    size_column : str, optional
        The size column to use instead of ``diameter_pixel`` /
        ``diameter_arcsec``. Its values are diameters in arcseconds if its
        name ends in ``arcsec`` (any case), in pixels otherwise; a size
        column with a unit of its own (ECSV, FITS, VOTable) is read in that
        unit, an angle or pixels, whatever its name.
    files_column : str or False, optional
        The column of per-source tile files (default ``fits_file_paths`` if
        present). Pass False to ignore such a column (for example when the
        tiles are given separately).
    progress : bool, optional
        Show a progress bar (tqdm) over the bytes of a CSV file when reading
        it takes longer than `READ_PROGRESS_DELAY` seconds.

    Returns
    -------
    catalog : `Catalog`
        One entry per input row, in input order; no row is ever dropped.

    Raises
    ------
    CatalogError
        If the file is missing or unreadable, has no RA or Dec column (the
        message lists the columns present and suggests the closest name), a
        named column does not exist, or no size is available at all (no
        ``size`` and no size column).
    ConfigError
        If ``size`` is not a positive finite number of pixels.
    TypeError
        If ``catalog`` is not a path or a table.

    Notes
    -----
    Row numbers in messages are 0-based data rows (row 0 is the first
    source). A row is marked `~cutana.Status.BAD_ROW` when

    - RA or Dec is missing, neither a number nor a sexagesimal angle, or
      not finite;
    - Dec is outside ``[-90, 90]``; RA is outside ``[-360, 360]`` (RA in
      that range is wrapped into ``[0, 360)``);
    - a size value is not a number, not positive, infinite, rounds to 0
      pixels, or exceeds ``MAX_SIZE_PIXEL`` pixels / ``MAX_SIZE_ARCSEC``
      arcsec; or the row has no size at all (missing values in one size
      column are fine when the other size column gives a size);
    - the id is empty or missing, or repeats an earlier row's id (the first
      occurrence stays valid);
    - (CSV) the line has more fields than the header names columns, which
      astropy's reader refuses the whole file for; none of its values is
      read (unless most lines have too many: the file is then refused);
    - the ``fits_file_paths`` cell is missing or is not a path or a list of
      paths.

    RA and Dec are in degrees, or in a column's own angular unit (ECSV,
    FITS, VOTable). Text values that are not numbers are read as
    sexagesimal angles, as `~astropy.coordinates.SkyCoord` reads them with
    ``unit=(u.hourangle, u.deg)``: ``10:00:00.5`` or ``10 00 00.5`` is
    10 h 0 m 0.5 s of RA and ``-02:10:00`` is -2° 10′ of Dec; a value with
    units of its own (``10h00m00.5s``, ``150d30m``, ``-2d10m``) is read in
    those. A value astropy cannot read as an angle is a bad row, with
    astropy's reason.

    Invalid RA, Dec and size values become NaN. Relative paths in
    ``fits_file_paths`` are resolved against the catalogue file's folder;
    a path that names no file there but one in the working directory (as
    ESA Cutana, which opens the paths as given, reads it) is resolved
    against the working directory. For an in-memory table paths are kept as
    given; URLs are kept as given.
    Without an id column, the id of each row is its row number.

    Examples
    --------
    >>> from astropy.table import Table
    >>> from cutana.catalog import read_catalog
    >>> t = Table({"id": ["a", "b"], "ra": [10.0, 11.0], "dec": [1.0, 95.0]})
    >>> cat = read_catalog(t, size=64)
    >>> cat.status.tolist()
    [0, 3]
    >>> cat.messages[1]
    "<Table> row 1 column 'dec': value 95.0 is outside [-90, 90]"
    """
    if size is not None:
        size = _check_size_value(size)
    cols, source, label, folder = _load(catalog, id_column, progress=progress)
    names, n = cols.names, cols.nrows

    ra_name, dec_name = _skycoord_column(cols, ra_column, dec_column, source)
    if ra_name is None:
        ra_name = _resolve(names, "ra", ra_column, source, required=True)
        dec_name = _resolve(names, "dec", dec_column, source, required=True)
    id_name = _resolve(names, "id", id_column, source, required=False)
    files_name = None
    if files_column is not False:
        files_name = _resolve(names, "files", files_column, source, required=False)

    size_cols = []  # (name, unit) with unit 'pixel' or 'arcsec'
    if size is None:
        if size_column is not None:
            name = _resolve(
                names,
                "diameter_pixel",
                size_column,
                source,
                required=False,
                keyword="size_column",
            )
            unit = "arcsec" if name.lower().endswith("arcsec") else "pixel"
            size_cols.append((name, unit))
        else:
            for role, unit in (
                ("diameter_pixel", "pixel"),
                ("diameter_arcsec", "arcsec"),
            ):
                name = _resolve(names, role, None, source, required=False)
                if name is not None:
                    size_cols.append((name, unit))
        if not size_cols:
            msg = (
                f"catalogue {source!r} gives no cutout size: pass --size N (size=N, "
                "in pixels) or add a diameter_pixel or diameter_arcsec column "
                f"(columns present: {', '.join(map(repr, names)) or 'none'})"
            )
            raise CatalogError(msg)

    problems = {}

    def report(rows, column, text_of):
        for i in np.flatnonzero(rows).tolist():
            problems.setdefault(i, []).append(f"column {column!r}: {text_of(i)}")

    # ---- coordinates
    coords = {}
    for role, name in (("ra", ra_name), ("dec", dec_name)):
        raw, mask, unit = cols.get(name)
        _one_per_row(raw, name, source)
        values, problem = _to_float(raw, mask)
        values = values * _angle_factor(unit, name, role, source)
        reasons = _read_sexagesimal(raw, values, problem, unit, role)
        report(problem == _MISSING, name, lambda i: "value is missing")
        report(
            problem == _NOT_NUMBER,
            name,
            lambda i, raw=raw, why=reasons: (
                f"value {_show(raw[i])} is not a number"
                + (f", nor an angle astropy reads ({why[i]})" if i in why else "")
            ),
        )
        finite = np.isfinite(values)
        report(
            (problem == _OK) & ~finite,
            name,
            lambda i, v=values: f"value {_show(v[i])} is not finite",
        )
        with np.errstate(invalid="ignore"):
            if role == "dec":
                out = finite & ((values < -90) | (values > 90))
                report(
                    out,
                    name,
                    lambda i, v=values: f"value {_show(v[i])} is outside [-90, 90]",
                )
            else:
                out = finite & ((values < -360) | (values > 360))
                report(
                    out,
                    name,
                    lambda i, v=values: (
                        f"value {_show(v[i])} is outside [-360, 360] (an RA in "
                        "that range is wrapped into [0, 360); one beyond it is "
                        "taken for an error)"
                    ),
                )
        values = np.where(finite & ~out, values, np.nan)
        if role == "ra":
            values = np.mod(values, 360.0)
            values[values >= 360.0] = 0.0  # -1e-20 % 360 == 360.0
        coords[role] = values

    # ---- sizes
    size_pixel = np.full(n, np.nan)
    size_arcsec = np.full(n, np.nan)
    if size is not None:
        size_pixel[:] = size
    else:
        has_size = np.zeros(n, dtype=bool)  # (the columns' order: which wins)
        absent = []
        for name, named in size_cols:
            raw, mask, column_unit = cols.get(name)
            _one_per_row(raw, name, source)
            values, problem = _to_float(raw, mask)
            unit, factor = _size_kind(column_unit, named, name)
            if factor != 1.0:
                with np.errstate(invalid="ignore", over="ignore"):
                    values = values * factor
            limit = MAX_SIZE_PIXEL if unit == "pixel" else MAX_SIZE_ARCSEC
            # a value of a column a row does not use (diameter_pixel wins over
            # diameter_arcsec) is no fault of the row's
            problem = np.where(has_size, _OK, problem)
            report(
                problem == _NOT_NUMBER,
                name,
                lambda i, raw=raw: f"value {_show(raw[i])} is not a number",
            )
            with np.errstate(invalid="ignore"):
                given = (problem == _OK) & ~np.isnan(values)
                nonpos = given & (values <= 0)
                infinite = given & np.isinf(values)
                big = given & ~infinite & (values > limit)
                tiny = (
                    given & ~nonpos & ~infinite & (np.round(values) < 1)
                    if unit == "pixel"
                    else np.zeros(n, bool)
                )
            report(
                nonpos & ~has_size,
                name,
                lambda i, v=values: f"value {_show(v[i])} is not a positive size",
            )
            report(
                infinite & ~has_size,
                name,
                lambda i, v=values: f"value {_show(v[i])} is not finite",
            )
            report(
                big & ~has_size,
                name,
                lambda i, v=values, lim=limit, un=unit: (
                    f"value {_show(v[i])} exceeds {lim} {un}s"
                ),
            )
            report(
                tiny & ~has_size,
                name,
                lambda i, v=values: f"value {_show(v[i])} rounds to 0 pixels",
            )
            valid = given & ~nonpos & ~infinite & ~big & ~tiny
            has_size |= valid
            # (two columns of one kind, by their units: the first one given)
            if unit == "pixel":
                size_pixel = np.where(np.isnan(size_pixel) & valid, values, size_pixel)
            else:
                fill = np.isnan(size_arcsec) & valid
                size_arcsec = np.where(fill, values, size_arcsec)
            absent.append((name, values, problem))
        lacking = ~has_size
        for _name, values, problem in absent:
            lacking &= (problem == _MISSING) | ((problem == _OK) & np.isnan(values))
        for i in np.flatnonzero(lacking).tolist():
            parts = [
                f"column {name!r}: value "
                + ("is missing" if problem[i] == _MISSING else f"{_show(values[i])}")
                for name, values, problem in absent
            ]
            problems.setdefault(i, []).append(
                "; ".join(parts)
                + ", so the row has no size (pass --size or fill the column)"
            )

    # ---- ids
    if id_name is not None:
        raw, mask, _ = cols.get(id_name)
        _one_per_row(raw, id_name, source)
        ids, missing = _ids(raw, mask)
        report(
            missing,
            id_name,
            lambda i, t=ids: (
                "value is missing" if not t[i] else f"value {_show(t[i])} is empty"
            ),
        )
    else:
        ids = np.arange(n).astype(str) if n else np.zeros(0, dtype="<U1")

    # ---- tile files
    files = None
    if files_name is not None:
        raw, mask, _ = cols.get(files_name)
        cache = {}
        resolved = {}
        files = []
        bad_files = np.zeros(n, dtype=bool)
        # object cells may be arrays (Parquet lists); a 2-D column (FITS
        # fixed-width array) gives one list of paths per row
        cells = list(raw) if raw.dtype.kind == "O" else raw.tolist()
        for i, cell in enumerate(cells):
            if mask is not None and mask[i]:
                parsed = None
            elif isinstance(cell, str):
                parsed = cache.get(cell, False)
                if parsed is False:
                    parsed = cache[cell] = _parse_files(cell, folder, resolved)
            else:
                parsed = _parse_files(cell, folder, resolved)
            if parsed is None:
                bad_files[i] = True
                files.append(())
            else:
                files.append(parsed)
        report(
            bad_files,
            files_name,
            lambda i, raw=raw, m=mask: _files_problem(raw[i], m is not None and m[i]),
        )

    for i, text in cols.malformed.items():
        problems[i] = [text]  # not "value is missing" in every column
    if id_name is not None and n:
        # the first of the good rows with one id is cut, the later ones are
        # bad rows: a bad row before it does not take it along (a bad row
        # is told the earlier row of its id all the same)
        bad = np.zeros(n, dtype=bool)
        bad[list(problems)] = True
        dup, first_of = _duplicates(ids, missing)
        if (dup & ~bad & bad[first_of]).any():
            dup_good, first_good = _duplicates(ids, missing | bad)
            dup = np.where(bad, dup, dup_good)
            first_of = np.where(bad, first_of, first_good)
        if cols.malformed:
            dup[list(cols.malformed)] = False  # (their line is their message)
        report(
            dup,
            id_name,
            lambda i, t=ids, f=first_of: (
                f"value {_show(t[i])} duplicates the id of row {f[i]}"
            ),
        )
    status = np.full(n, Status.OK, dtype=np.int16)
    messages = {}
    for i in sorted(problems):
        status[i] = Status.BAD_ROW
        messages[i] = f"{label} row {i} " + "; ".join(problems[i])

    used = {"id": id_name, "ra": ra_name, "dec": dec_name, "files": files_name}
    for name, unit in size_cols:
        used["diameter_" + unit] = name
    n_bad = len(messages)
    if n_bad:
        logger.info("catalogue %s: %d of %d rows are bad", source, n_bad, n)
    else:
        logger.debug("catalogue %s: %d rows, all valid", source, n)
    return Catalog(
        source_id=ids,
        ra=coords["ra"],
        dec=coords["dec"],
        size_pixel=size_pixel,
        size_arcsec=size_arcsec,
        fits_file_paths=files,
        status=status,
        messages=messages,
        source=source,
        columns=used,
    )
