# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Make the importing process ignore SIGINT: the first module a worker server
preloads (`cutana.executor.WORKER_PRELOAD`).

A Ctrl-C reaches every process of the terminal's process group. The main
process of a run stops the run and its workers itself; the worker server
and its workers (which inherit this) ignore it, also while the server is
still importing the pipeline, which would otherwise end with a traceback.
Importing this module anywhere else changes that process's SIGINT handling
too: it is meant for the worker server only.
"""

import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)
