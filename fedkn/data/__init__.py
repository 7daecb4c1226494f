"""The data layer: datasets in memory, client partitions, per-client splits and batches.

Pipeline: :func:`load_dataset` -> :func:`partition` (via :func:`build_federation`) ->
:class:`ClientSplit` index arrays -> :func:`iterate_batches` with a :class:`Preprocess`.
The function ``partition`` is not re-exported: ``fedkn.data.partition`` stays the module (import
the function with ``from fedkn.data.partition import partition``). Reporting
(:mod:`fedkn.data.report`) is not imported here either, to keep matplotlib out of workers.
"""

from fedkn.data.batches import iterate_batches
from fedkn.data.datasets import DATASETS, ImageDataset, load_dataset
from fedkn.data.federation import ClientSplit, Federation, build_federation
from fedkn.data.partition import SCHEMES, format_partition, parse_partition, resolve_params
from fedkn.data.transforms import Preprocess, preprocess_for

__all__ = [
    "DATASETS",
    "SCHEMES",
    "ClientSplit",
    "Federation",
    "ImageDataset",
    "Preprocess",
    "build_federation",
    "format_partition",
    "iterate_batches",
    "load_dataset",
    "parse_partition",
    "preprocess_for",
    "resolve_params",
]
