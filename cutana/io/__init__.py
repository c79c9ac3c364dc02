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

# Each name is imported from its module when first used (PEP 562), so that a
# process that needs one writer (a worker: `cutana._tasks`) does not import
# the others and the libraries they use (astropy's tables and WCS, zarr).
_NAMES = {
    "staging": (
        "JobResult", "StagedJob", "clean_staging", "list_staged", "load_staged",
        "remove_run_state", "remove_staged", "stage_job", "staged_receipt",
        "staging_dir", "state_dir", "verify_staged",
    ),
    "ledger": ("Ledger", "LedgerState"),
    "zarr": ("ChunksWritten", "ZarrWriter", "chunk_digest", "choose_chunk_rows"),
    "fits": (
        "FitsWriter", "INDEX_NAME", "IndexColumns", "cutout_status",
        "extension_names", "fits_filenames", "read_index", "write_index",
    ),
    "archive": (
        "CutoutArchive", "FitsArchive", "ZarrArchive", "open_output", "verify_output",
    ),
}
_MODULE_OF = {name: module for module, names in _NAMES.items() for name in names}

__all__ = [*_MODULE_OF]


def __getattr__(name):
    import importlib

    if name in _NAMES:  # a submodule not imported yet
        return importlib.import_module(f"{__name__}.{name}")
    module = _MODULE_OF.get(name)
    if module is None:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
