# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Outputs of a cutana run: atomic staging of job results, the completion
ledger, the Zarr and FITS writers, and reading and checking outputs.

A run writes through these steps:

1. the parent creates the output (`ZarrWriter.create` or
   `FitsWriter.create`) and opens the `Ledger`;
2. workers stage each job's result (`stage_job`; for FITS after
   `FitsWriter.write_sources`), the parent records each receipt
   (`Ledger.job_staged`);
3. once every row of a chunk is staged, some process assembles and writes it
   (`ZarrWriter.write_chunks`) and the parent records its checksum
   (`Ledger.chunks_written`);
4. the parent finishes (`ZarrWriter.finalize` or `write_index`), records
   `Ledger.run_finished`, and removes the bookkeeping
   (`remove_run_state`).
"""

from .archive import *  # noqa: F401,F403
from .archive import __all__ as _archive_all
from .fits import *  # noqa: F401,F403
from .fits import __all__ as _fits_all
from .ledger import *  # noqa: F401,F403
from .ledger import __all__ as _ledger_all
from .staging import *  # noqa: F401,F403
from .staging import __all__ as _staging_all
from .zarr import *  # noqa: F401,F403
from .zarr import __all__ as _zarr_all

__all__ = [*_staging_all, *_ledger_all, *_zarr_all, *_fits_all, *_archive_all]
