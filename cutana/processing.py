# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Cutting one job: what a worker does with a tile and a slice of its sources.

For each band of the job's tile, the band file is opened memory-mapped, the
sources are cut in small sub-batches (sorted by row on the tile, so that
neighbouring windows share pages) by the compiled kernels, converted to
physical units (``BSCALE``/``BZERO``, optional flux conversion from the
header zero point and an optional channel weight), resampled to the target
grid, and normalised into the output dtype (with a core to spare, in a
second thread while the next sub-batch is resampled). Pages of the tile
that a sub-batch touched are handed back to the operating system before
the next one, so a worker's memory does not grow with the tile.

This module reads pixels but knows nothing about output formats.
"""

import logging
import math
import mmap
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np

from ._geometry import BOX_OK, compute_boxes
from ._stack import extract_stack
from .exceptions import TileError
from .io.staging import JobResult
from .normalization import Normalizer
from .planner import SUB_BATCH, working_dtype
from .resample import Resampler
from .status import Status
from .tiles import missing_band_message, mmap_of, open_pixels

__all__ = [
    "CutSettings",
    "JANSKY_AB",
    "NOT_FLUX_PLANES",
    "Scratch",
    "converts_flux",
    "cut_job",
    "flux_factor",
    "images_nbytes",
    "ready_scratch",
]

logger = logging.getLogger(__name__)

#: Bytes of windows cut between two hand-backs of mapped tile pages.
RELEASE_BYTES = 32 * 2**20

_STRETCHER = []  # the thread of `cut_job`'s ``stretch_thread``, made on first use
if hasattr(os, "register_at_fork"):
    # a forked child has none of its parent's threads
    os.register_at_fork(after_in_child=_STRETCHER.clear)

#: Flux density of magnitude 0 in the AB system, in Jansky.
JANSKY_AB = 3631.0

#: Last word of the name of a band whose pixels are not fluxes (bit masks,
#: normalised PSF images): flux conversion leaves them as stored.
NOT_FLUX_PLANES = frozenset(("FLAG", "FLAGS", "MASK", "BPM", "PSF"))


@dataclass(frozen=True)
class CutSettings:
    """Everything a worker needs to cut a job, besides the job and its tile.

    Attributes
    ----------
    out_shape : tuple of int or None
        ``(H, W)`` of the output, or `None` for the extracted size.
    resample : str
        ``'none'``, ``'nearest'``, ``'bilinear'`` or ``'area'``.
    normalize : str
        Normalisation name (see `cutana.normalization`).
    dtype : str
        Output dtype: ``'float32'``, ``'uint8'`` or ``'uint16'``.
    flux_conversion : bool
        Whether to convert pixel values to Jansky from the zero point (of
        every band but flag, mask and PSF planes: `converts_flux`).
    zeropoint_keyword : str
        Header keyword holding the AB zero point.
    channel_weights : tuple of float or None
        Per-band multiplicative weights.
    norm_kwargs : dict
        Extra parameters of the normalisation (percentile, a, contrast, ...).
    n_threads : int
        Threads of the compiled kernels inside one worker.
    keep_bytes : int
        Bytes of tile files a worker may keep mapped from one job to the
        next (`cutana.tiles.open_pixels`); 0 maps every job afresh and
        hands the pages back as the job goes.
    band_names : tuple of str
        Names of the bands, in channel order (for messages).

    Examples
    --------
    >>> from cutana.processing import CutSettings
    >>> settings = CutSettings(out_shape=(64, 64), resample="bilinear",
    ...                        normalize="asinh", dtype="uint8")
    >>> settings.out_shape, settings.dtype, settings.flux_conversion, settings.n_threads
    ((64, 64), 'uint8', False, 1)
    """

    out_shape: tuple | None
    resample: str = "none"
    normalize: str = "none"
    dtype: str = "float32"
    flux_conversion: bool = False
    zeropoint_keyword: str = "MAGZERO"
    channel_weights: tuple | None = None
    norm_kwargs: dict = field(default_factory=dict)
    n_threads: int = 1
    keep_bytes: int = 0
    band_names: tuple = ()

    def band_name(self, c):
        """The name of channel ``c`` for messages (its index if unnamed)."""
        return self.band_names[c] if c < len(self.band_names) else c


def converts_flux(band_name):
    """Whether flux conversion applies to the band ``band_name``.

    It does to every band but flag, mask and PSF planes: those whose name
    ends in one of `NOT_FLUX_PLANES` (as its last word, after ``-``, ``_``
    or ``.``, in any case), such as the ``VIS-FLAG`` plane of the Euclid file
    ``EUC_MER_MOSAIC-VIS-FLAG_TILE...``. Their values are bits or a
    normalised profile: a factor would change their meaning, and their
    files need no zero point.

    Parameters
    ----------
    band_name : str
        A band name of the tile index.

    Returns
    -------
    converts : bool

    Examples
    --------
    >>> from cutana.processing import converts_flux
    >>> converts_flux("VIS"), converts_flux("VIS-RMS"), converts_flux("VIS-FLAG")
    (True, True, False)
    >>> converts_flux("r_mask"), converts_flux("PSF")
    (False, False)
    """
    word = re.split(r"[-_.]", str(band_name).strip().upper())[-1]
    return word not in NOT_FLUX_PLANES


def flux_factor(zeropoint):
    """Factor converting pixel values with AB zero point ``zeropoint`` to Jansky.

    Parameters
    ----------
    zeropoint : float
        AB magnitude of a source of one count (``MAGZERO``).

    Returns
    -------
    factor : float
        ``3631 * 10 ** (-0.4 * zeropoint)``.

    Examples
    --------
    >>> round(flux_factor(23.9) * 1e6, 3)  # 23.9 AB mag = 1 microjansky
    1.0
    """
    return JANSKY_AB * 10.0 ** (-0.4 * float(zeropoint))


def _release_pages(arr):
    """Tell the OS that the mapped pages behind ``arr`` may be dropped."""
    base = mmap_of(arr)
    if base is not None and hasattr(mmap, "MADV_DONTNEED"):
        try:
            base.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # pragma: no cover - closed or unsupported
            pass


def _region(data, starts, sizes, shape):
    """The windows' part of a tile as an array, and the starts within it.

    ``data`` is returned as is if it is an array (a memory map). A compressed
    or remote tile gives an astropy ``section`` instead: only the bounding
    box of the windows (clipped to the tile) is read from it, so that only
    the compressed tiles or bytes they touch are decompressed or fetched.

    Parameters
    ----------
    data : `~numpy.ndarray` or section
        The tile's pixels (`cutana.tiles.TilePixels.data`).
    starts : `~numpy.ndarray`
        ``(n, 2)`` int64 ``(y0, x0)`` of each window in the tile.
    sizes : `~numpy.ndarray`
        ``(n, 2)`` ``(ny, nx)`` of each window.
    shape : tuple of int
        ``(ny, nx)`` of the tile.

    Returns
    -------
    data : `~numpy.ndarray`
        The tile or the part read.
    starts : `~numpy.ndarray`
        The windows' starts in ``data``.
    """
    if isinstance(data, np.ndarray):
        return data, starts
    starts = np.asarray(starts, dtype=np.int64)
    stops = starts + np.asarray(sizes, dtype=np.int64)
    lo = np.clip(starts.min(axis=0), 0, shape)
    hi = np.clip(stops.max(axis=0), 0, shape)
    hi = np.maximum(hi, np.minimum(lo + 1, shape))  # never an empty read
    lo = np.minimum(lo, hi - 1)
    y0, x0 = (int(v) for v in lo)
    y1, x1 = (int(v) for v in hi)
    part = np.asarray(data[y0:y1, x0:x1])
    return part, np.ascontiguousarray(starts - np.array([y0, x0], dtype=np.int64))


class Scratch:
    """Reusable arrays for the jobs of one process.

    Fresh memory costs a page fault per page the first time it is written,
    and on virtual machines that is slower than the cutting itself; a
    worker therefore cuts every job into the same buffers. An array handed
    out is valid until the next `get` of the same name.

    Examples
    --------
    >>> import numpy as np
    >>> from cutana.processing import Scratch
    >>> scratch = Scratch()
    >>> a = scratch.get("block", (2, 3), np.float32)
    >>> a.shape, a.dtype
    ((2, 3), dtype('float32'))
    >>> b = scratch.get("block", (6,), np.float32)  # same memory, reused
    >>> bool(np.shares_memory(a, b))
    True
    >>> scratch.reserve("block", 4000)  # room for the largest use at once
    >>> c = scratch.get("block", (1000,), np.float32)
    >>> bool(np.shares_memory(c, scratch.get("block", (10,), np.float32)))
    True
    >>> scratch.clear()
    """

    def __init__(self):
        self._bufs = {}
        self._touched = {}  # name -> bytes written by `touch` since made

    def get(self, name, shape, dtype):
        """A C-contiguous array of ``shape`` and ``dtype`` (contents undefined).

        Parameters
        ----------
        name : str
            Buffer name.
        shape : tuple of int
            Array shape.
        dtype : `~numpy.dtype`
            Array dtype.

        Returns
        -------
        array : `~numpy.ndarray`
            A view of the named buffer, grown if needed.
        """
        dtype = np.dtype(dtype)
        nbytes = math.prod(int(v) for v in shape) * dtype.itemsize
        self.reserve(name, max(nbytes, 1))
        return self._bufs[name][:nbytes].view(dtype).reshape(shape)

    def reserve(self, name, nbytes):
        """Make the named buffer hold at least ``nbytes`` from now on.

        A buffer that grows is made anew, and its pages are faulted in
        again as it is written (about 3 us a page on the virtual machine
        measured). A worker that reserves the largest block of its run at
        its first job, instead of growing it with its jobs, writes each
        page once. Pages never written take no memory, so the reserve
        costs only address space.

        Parameters
        ----------
        name : str
            Buffer name.
        nbytes : int
            Bytes the buffer should hold.
        """
        buf = self._bufs.get(name)
        if nbytes > 0 and (buf is None or buf.nbytes < nbytes):
            self._bufs[name] = np.empty(int(nbytes), dtype=np.uint8)
            self._touched.pop(name, None)

    def touch(self, name, nbytes):
        """Reserve the named buffer (`reserve`) and write its first
        ``nbytes`` now, once: a worker that does this while it waits for its
        first job does not take those pages' faults in the job.

        Parameters
        ----------
        name : str
            Buffer name.
        nbytes : int
            Bytes to have written.
        """
        nbytes = int(nbytes)
        self.reserve(name, nbytes)
        done = self._touched.get(name, 0)
        if nbytes > done:
            self._bufs[name][done:nbytes] = 0
            self._touched[name] = nbytes

    def clear(self):
        """Release every buffer."""
        self._bufs.clear()
        self._touched.clear()


def ready_scratch(
    scratch, *, rows, n_channels, out_shape, dtype, work_dtype, stretch_thread=False
):
    """Make and write now the buffers of ``scratch`` that `cut_job` cuts a
    job of ``rows`` rows into (`Scratch.touch`): its cutouts (``images``)
    and its sub-batches in the working dtype (two with ``stretch_thread``).

    A worker does this while the main process creates the output, before
    its first job, which took the page faults of these buffers otherwise:
    on the paper workload with two workers, a worker's first job had
    20,800 page faults and took 0.21-0.29 s, and 8,100 faults and
    0.18-0.23 s after this (the jobs after it take about 0.16 s).

    Parameters
    ----------
    scratch : `Scratch`
        The worker's buffers.
    rows : int
        Rows of the largest job.
    n_channels : int
        Channels (bands) of a cutout.
    out_shape : tuple of int
        ``(H, W)`` of a cutout.
    dtype, work_dtype : `~numpy.dtype`
        The output dtype and the working dtype (`cutana.planner.working_dtype`).
    stretch_thread : bool, optional
        Whether the jobs stretch in a thread of their own (`cut_job`).
    """
    scratch.touch("images", images_nbytes(rows, n_channels, out_shape, dtype))
    block = images_nbytes(min(rows, SUB_BATCH), 1, out_shape, work_dtype)
    for name in _BLOCKS[: 2 if stretch_thread else 1]:
        scratch.touch(name, block)


def images_nbytes(rows, n_channels, out_shape, dtype):
    """Bytes of ``rows`` cutouts of ``n_channels`` channels of ``out_shape``
    ``(H, W)`` in ``dtype``: the ``images`` block that `cut_job` cuts a job
    of ``rows`` rows into.

    Examples
    --------
    >>> from cutana.processing import images_nbytes
    >>> images_nbytes(10, 3, (150, 150), "uint8")
    675000
    """
    h, w = (int(v) for v in out_shape)
    return int(rows) * int(n_channels) * h * w * np.dtype(dtype).itemsize


def cut_job(settings, tile, job, scratch=None, out=None, stretch_thread=False):
    """Cut every source of a job from every band of its tile.

    Parameters
    ----------
    settings : `CutSettings`
        How to cut and convert.
    tile : `~cutana.tiles.Tile`
        The job's tile (headers and paths only).
    job : `~cutana.planner.Job`
        The sources: catalogue rows, pixel positions, box sizes.
    scratch : `Scratch`, optional
        Reusable buffers; the result's ``images`` then lives in ``scratch``
        and is valid only until the next job cut with it.
    out : `~numpy.ndarray`, optional
        ``(n, C, H, W)`` array of the output dtype to cut into (it becomes
        the result's ``images``), e.g. a slice of a larger block that
        several jobs fill.
    stretch_thread : bool, optional
        Stretch (normalise and convert) each sub-batch of cutouts in a
        second thread while the next one is read and resampled into a
        second buffer: for a core to spare. The same values either way.

    Returns
    -------
    result : `~cutana.io.staging.JobResult`
        The cutouts ``(n, C, H, W)`` in the output dtype, with per-source
        status, box origin and size. A band that cannot be read (or a
        band the tile lacks) marks the job's sources
        `cutana.Status.TILE_ERROR` with a message and leaves their images 0
        in every band; it does not raise.

    Examples
    --------
    >>> import tempfile
    >>> from cutana import Status
    >>> from cutana.bench.synthetic import make_demo_survey
    >>> from cutana.pipeline import plan_cutouts
    >>> from cutana.processing import CutSettings, cut_job
    >>> from cutana.tiles import TileIndex
    >>> survey = make_demo_survey(tempfile.mkdtemp(), n_sources=40)
    >>> paths = [p for tile_paths in survey.tile_paths for p in tile_paths]
    >>> index = TileIndex.from_paths(paths)
    >>> plan = plan_cutouts(survey.catalogue_path, tiles=paths, size=16,
    ...                     memory_limit="2GB")
    >>> job = plan.jobs[0]
    >>> result = cut_job(CutSettings(out_shape=(16, 16)), index.tiles[job.tile], job)
    >>> result.images.shape == (len(job), 4, 16, 16)
    True
    >>> bool(set(result.status.tolist()) <= {Status.OK, Status.PARTIAL_OVERLAP})
    True
    """
    n = len(job)
    n_channels = len(tile.bands)
    if settings.out_shape is not None:
        out_shape = tuple(int(v) for v in settings.out_shape)
    else:
        out_shape = tuple(int(v) for v in job.box[0]) if n else (0, 0)
    if out is not None:
        need = (n, n_channels) + out_shape
        if out.shape != need or out.dtype != np.dtype(settings.dtype):
            msg = (
                f"out has shape {out.shape} and dtype {out.dtype}; the job needs "
                f"{need} of {np.dtype(settings.dtype)}"
            )
            raise ValueError(msg)
        images = out  # every row of every channel is written below
        scratch = Scratch() if scratch is None else scratch
    elif scratch is None:
        scratch = Scratch()  # private to this call
        images = np.zeros((n, n_channels) + out_shape, dtype=settings.dtype)
    else:
        # every row of every channel is written below (a channel that fails
        # is zeroed), so the reused buffer needs no clearing first
        images = scratch.get("images", (n, n_channels) + out_shape, settings.dtype)
    status = np.full(n, Status.OK, dtype=np.int16)
    messages = {}

    boxes = compute_boxes(tile.shape, job.box, np.c_[job.y, job.x], "partial")
    starts = boxes.start
    partial = boxes.is_partial
    status[partial] = Status.PARTIAL_OVERLAP
    # (the planner gives a job only sources whose box meets the tile: the
    # reference band file, or one of the band files on grids of their own)
    off = boxes.code != BOX_OK
    own_boxes = _own_band_boxes(tile, job)
    meets = np.zeros(n, dtype=bool)
    for placed, band_boxes in own_boxes.values():
        meets |= placed & (band_boxes.code == BOX_OK)
    missed = off & ~meets
    status[missed] = Status.NO_OVERLAP
    for r in np.flatnonzero(missed).tolist():
        messages[int(job.rows[r])] = "the cutout does not overlap its tile"
    origin = np.ascontiguousarray(starts[:, ::-1])
    order = np.lexsort((job.x, job.y))  # sweep the tile top to bottom
    same_size = bool(np.all(job.box == job.box[:1])) if n else True
    band_starts, band_origin = _own_grid_boxes(
        settings, tile, job, own_boxes, missed, status, messages, origin
    )
    if (off & ~missed).any():
        # a box that misses the reference band file but meets another band's
        # is cut wholly outside it (all fill), as that band's Cutout2D raises
        starts = np.where((off & ~missed)[:, None], -np.asarray(job.box), starts)
        reference = tile.reference
        status[off & ~missed] = Status.PARTIAL_OVERLAP
        for r in np.flatnonzero(off & ~missed).tolist():
            row = int(job.rows[r])
            text = f"the cutout does not overlap {reference.path}"
            messages[row] = f"{messages[row]}; {text}" if row in messages else text

    for c, band in enumerate(tile.bands):
        if band is None:
            text = missing_band_message(tile, settings.band_name(c))
        else:
            box = job.band_boxes(c)
            same = same_size if box is job.box else bool(np.all(box == box[:1]))
            try:
                _cut_band(
                    settings, band, c, box, band_starts.get(c, starts), order,
                    same, out_shape, images, scratch, stretch_thread,
                )
                continue
            except (OSError, ValueError, KeyError, EOFError, zlib.error) as exc:
                # EOFError, zlib.error: damaged data of a compressed tile
                reason = str(exc)
                if isinstance(exc, KeyError) and exc.args:
                    reason = str(exc.args[0])  # without the quotes KeyError adds
                text = (
                    reason
                    if isinstance(exc, TileError)  # already names the file
                    else f"{band.path}: {type(exc).__name__}: {reason}"
                )
                logger.warning("tile error: %s", text)
        # a source missing a band is not cut at all: its row is filled in
        # every band, as that of any source that could not be cut
        images[...] = 0
        status[:] = Status.TILE_ERROR
        for r in job.rows:
            messages[int(r)] = text
        break
    if missed.any():
        images[missed] = 0  # as the rows of sources that are not cut
    return JobResult(
        job_id=job.job_id,
        rows=np.asarray(job.rows, dtype=np.int64),
        images=images,
        status=status,
        tile=int(job.tile),
        origin=origin.astype(np.int64),
        box_shape=np.asarray(job.box, dtype=np.int64),
        messages=messages,
        band_origin=band_origin,
        band_box=job.band_box,
    )


def _own_band_boxes(tile, job):
    """The boxes of a job's sources in the band files of its tile that are
    on pixel grids of their own (`~cutana.tiles.Tile.own_grid`): band index
    -> ``(placed, boxes)``, whether the file's WCS places each source, and
    its `~cutana._geometry.compute_boxes` boxes there (empty when there is
    no such band).

    A source's box in such a band has the reference band's size (or its own,
    ``job.band_box``), placed at the source's position in that file
    (``job.band_xy``) by astropy's rounding rules; a source the WCS cannot
    place gets the box of position 0, 0, which is then not written (the
    source misses the band).
    """
    if job.band_xy is None or not len(job):
        return {}
    out = {}
    for c in tile.own_grid:
        if tile.bands[c] is None:
            continue
        xy = job.band_xy[:, c]
        placed = np.all(np.isfinite(xy), axis=1)
        yx = np.where(placed[:, None], xy[:, ::-1], 0.0)
        out[c] = placed, compute_boxes(tile.bands[c].shape, job.band_boxes(c), yx,
                                       "partial")
    return out


def _own_grid_boxes(settings, tile, job, own_boxes, missed, status, messages, origin):
    """Where the cutouts of a job's sources start in the band files of its
    tile on pixel grids of their own (``own_boxes``, `_own_band_boxes`).

    A box that leaves that file's pixels makes the source
    `~cutana.Status.PARTIAL_OVERLAP` (the band is filled there); one that
    misses the file also gets a message. ``status`` and ``messages`` are
    changed in place. Returns ``(starts, band_origin)``: band index ->
    ``(n, 2)`` ``(y0, x0)`` first pixels, and the ``(n, C, 2)`` ``(x0, y0)``
    origins of every band (`JobResult.band_origin`), or ``({}, None)``.
    """
    if not own_boxes:
        return {}, None
    band_origin = np.repeat(origin[:, None, :], len(tile.bands), axis=1)
    starts = {}
    for c, (placed, boxes) in own_boxes.items():
        band = tile.bands[c]
        box = job.band_boxes(c)
        off = ((boxes.code != BOX_OK) | ~placed) & ~missed
        partial = (boxes.is_partial & ~missed) | off
        status[partial & (status == Status.OK)] = Status.PARTIAL_OVERLAP
        for r in np.flatnonzero(off).tolist():
            text = (
                f"band {settings.band_name(c)}: the cutout does not overlap "
                f"{band.path}"
            )
            row = int(job.rows[r])
            messages[row] = f"{messages[row]}; {text}" if row in messages else text
        # a box that misses the file is cut wholly outside it: all fill
        starts[c] = np.where(off[:, None], -np.asarray(box), boxes.start)
        band_origin[:, c] = boxes.start[:, ::-1]
    return starts, band_origin


def _physical(block, pixels, blank, factor):
    """Turn stored values extracted into ``block`` into physical ones, times
    ``factor``, in place: ``BLANK`` becomes NaN, then ``BSCALE`` and
    ``BZERO`` are applied in the block's float type, in astropy's order, and
    the factor in float64."""
    work = block.dtype.type
    if blank is not None:
        # exact: 8- and 16-bit stored values are cut in float32, wider ones
        # in float64 (`working_dtype`)
        block[block == work(blank)] = np.nan
    if pixels.bscale != 1.0:
        block *= work(pixels.bscale)
    if pixels.bzero != 0.0:
        block += work(pixels.bzero)
    if factor != 1.0:
        # one rounding of the exact product, as the resampling kernel does
        np.multiply(block, factor, out=block, dtype=np.float64, casting="same_kind")


#: Names of the two sub-batch buffers of `_cut_band` (one with no stretch thread).
_BLOCKS = ("block", "block-2")


def _cut_band(
    settings, band, c, sizes_c, starts, order, same_size, out_shape, images, scratch,
    stretch_thread=False,
):
    """Cut one band of a job into ``images[:, c]``: boxes of ``sizes_c``
    (``(n, 2)`` ``(ny, nx)``) from ``starts``; with ``stretch_thread``, each
    sub-batch is stretched in `_STRETCHER` while the next is resampled."""
    factor = 1.0
    names = settings.band_names
    if settings.flux_conversion and (c >= len(names) or converts_flux(names[c])):
        zp = band.zeropoint(settings.zeropoint_keyword)
        if zp is None:
            msg = (
                f"header has no zero-point keyword {settings.zeropoint_keyword!r} "
                "needed for --flux-conversion"
            )
            raise KeyError(msg)
        factor = flux_factor(zp)
    if settings.channel_weights is not None:
        factor *= float(settings.channel_weights[c])

    # nearest to the same size copies the windows; bilinear and area are
    # computed even then, as `BatchCutout2D.resample` does (a NaN reaches
    # the neighbouring output pixel through a zero weight)
    direct = settings.resample == "none" or (
        settings.resample == "nearest"
        and same_size
        and tuple(sizes_c[0]) == tuple(out_shape)
    )
    n_channels = images.shape[1]
    if not images.flags.c_contiguous:  # reshaping would copy: writes lost
        msg = "the job's images must be a C-contiguous array"
        raise ValueError(msg)
    flat = images.reshape(-1, *images.shape[2:])
    stretch = Normalizer(
        settings.normalize, dtype=settings.dtype, n_threads=settings.n_threads,
        **settings.norm_kwargs,
    )
    # the windows in cutting order, once: a sub-batch is then a slice
    first_all = starts[order]
    boxes = sizes_c[order]
    # image i of band c is row i * C + c of the flattened images
    rows = order * n_channels + c
    stretching = [None, None]  # the stretch of each of two blocks, when threaded
    if stretch_thread and not _STRETCHER:
        _STRETCHER.append(ThreadPoolExecutor(1, thread_name_prefix="cutana-stretch"))
    with open_pixels(band, keep_bytes=settings.keep_bytes) as pixels:
        itemsize = np.dtype(pixels.data.dtype).itemsize
        work = working_dtype(pixels.data.dtype)
        touched = 0
        # stored values become physical ones as astropy scales them (BLANK
        # is NaN), before the flux factor and any resampling
        blank = pixels.blank
        resample = None
        try:
            for lo in range(0, len(order), SUB_BATCH):
                box = boxes[lo : lo + SUB_BATCH]
                sizes = np.broadcast_to(out_shape, box.shape) if direct else box
                first = first_all[lo : lo + SUB_BATCH]
                data, first = _region(pixels.data, first, sizes, band.shape)
                k = (lo // SUB_BATCH) % 2 if stretch_thread else 0
                if stretching[k] is not None:  # its block is free once stretched
                    stretching[k].result()
                block = scratch.get(_BLOCKS[k], (len(box), *out_shape), work)
                if direct:
                    block, _ = extract_stack(
                        data, first, out_shape, np.nan, dtype=work, out=block,
                        n_threads=settings.n_threads,
                    )
                    _physical(block, pixels, blank, factor)
                else:
                    if resample is None or data is not pixels.data:  # a part read
                        resample = Resampler(
                            data, out_shape, settings.resample, np.nan,
                            dtype=work, n_threads=settings.n_threads,
                            bscale=pixels.bscale, bzero=pixels.bzero, blank=blank,
                        )
                    resample(first, box, scale=factor, out=block)
                # straight into the job's rows: no copy through a buffer
                rows_k = rows[lo : lo + SUB_BATCH]
                if stretch_thread:
                    stretching[k] = _STRETCHER[0].submit(
                        stretch, block, out=flat, rows=rows_k
                    )
                else:
                    stretch(block, out=flat, rows=rows_k)
                # windows are swept top to bottom, so neighbouring sub-batches share
                # tile pages: hand pages back only every RELEASE_BYTES of windows
                if pixels.kept:  # its pages stay mapped for the next job
                    continue
                touched += int(np.sum(box[:, 0] * box[:, 1])) * itemsize
                if touched > RELEASE_BYTES:
                    _release_pages(pixels.data)
                    touched = 0
        finally:
            # (also after an error: the caller may clear the rows)
            wait([f for f in stretching if f is not None])
        for f in stretching:
            if f is not None:
                f.result()  # its error, if any
        if not pixels.kept:
            _release_pages(pixels.data)
