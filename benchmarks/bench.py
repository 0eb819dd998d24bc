"""The benchmark as a script: ``python benchmarks/bench.py [--quick] [--json] ...`` is ``iwae bench ...``.

All the measuring code is in :mod:`iwae.lab.bench` (see its docstring; log-weights are ``[k, batch]``).
"""

from __future__ import annotations

import sys

from iwae.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
