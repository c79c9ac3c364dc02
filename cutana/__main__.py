# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""``python -m cutana``: the ``cutana`` command (`cutana.cli.run_command`)."""

from .cli import run_command

if __name__ == "__main__":  # (not when a worker process imports it)
    run_command()
