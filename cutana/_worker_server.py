# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Ready the worker server: the module it preloads
(`cutana.executor.WORKER_PRELOAD`), and meant for it only (importing it
anywhere else changes that process's SIGINT handling and its exit).

- SIGINT is ignored first. A Ctrl-C reaches every process of the
  terminal's process group: the main process of a run stops the run and its
  workers itself; the server and its workers (which inherit this) ignore
  it, also while the server is still importing, which would otherwise end
  with a traceback.
- What the workers run (`cutana._tasks`, the pool's start of a worker in
  `cutana.executor`, and the Blosc modules that compress Zarr chunks) is
  imported with the cyclic collector paused (the imports make no
  garbage), and what they made is then frozen (`gc.freeze`): the
  collections of the server and of the workers forked from it never walk
  those objects again. The main process's layers and the libraries only
  they use (the catalogue readers and astropy's tables, astropy's WCS,
  zarr) are not imported: workers do not run them.
- The server ends without tearing its interpreter down (`os._exit` once
  it exits; it has nothing to flush). Tearing down the modules it had
  imported (then the whole pipeline) took the server about 0.2 s after
  the run had ended, and a caller reading the run's output through a
  pipe, which the server holds too, waited for it.
"""

import atexit
import gc
import os
import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)

gc.disable()
try:
    import numcodecs.blosc  # noqa: F401 - what workers compress Zarr chunks with

    import cutana._tasks  # noqa: F401 - what the workers run
    import cutana.executor  # noqa: F401 - and the pool's worker start (_init_worker)

    try:
        import blosc  # noqa: F401 - faster, where installed (io.zarr._blosc_encoder)
    except ImportError:
        pass
finally:
    gc.enable()
gc.freeze()

atexit.register(os._exit, 0)
