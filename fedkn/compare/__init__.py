"""``fedkn compare``: a grid of normalizations x partitions x seeds, tuned fairly, and its report.

- :mod:`fedkn.compare.grid`: cells, the ``--only`` filter, cell directories, running and resuming.
- :mod:`fedkn.compare.tuning`: the ``--lr-grid`` step, scored on a validation split.
- :mod:`fedkn.compare.report`: statistics over seeds, paired differences, ``report.md``.
- :mod:`fedkn.compare.plots`: accuracy-per-round and tuning plots.

Nothing here is imported by the Flower apps; matplotlib is imported only when plotting.
"""

from fedkn.compare.grid import Cell, expand_grid, parse_only, select
from fedkn.compare.report import build_report

__all__ = ["Cell", "build_report", "expand_grid", "parse_only", "select"]
