"""How a load is fed: pictures per forward pass and decode threads beside the model, for the device it runs on.

A processor gets the defaults (bench/ingest.py measured the split on 2 cores); TensorFlow on an NVIDIA GPU gets a
larger batch and a decode thread per core, and the load's first line says so. Which device there is comes from
ingest/precision.py (`Hardware`), which also decides the precision; explicit --batch-size and --workers win.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ingest.config import DEFAULT_BATCH_SIZE
from ingest.precision import Hardware

GPU_BATCH_SIZE = 128  # a GPU runs ResNet50 thousands of images/s; 32 a batch would leave it waiting on each call
CPU_WORKERS = 2  # decode threads beside the model on a processor (bench/ingest.py measured the split on 2 cores)


@dataclass(frozen=True)
class Feeding:
    """Batch size and decode threads of a load, and the line that says where the model runs (None on a processor)."""

    batch_size: int
    workers: int
    device_line: str | None = None


def feeding(hw: Hardware, precision: str, batch_size: int | None = None, workers: int | None = None,
            runtime: str = "openvino") -> Feeding:
    """With TensorFlow on a GPU: batches of GPU_BATCH_SIZE and a decode thread per core, said on the load's first
    line; on a processor: the defaults. Explicit --batch-size and --workers win either way."""
    if not hw.gpus or runtime != "tensorflow":
        return Feeding(batch_size or DEFAULT_BATCH_SIZE, workers or CPU_WORKERS)
    batch, threads = batch_size or GPU_BATCH_SIZE, workers or os.cpu_count() or CPU_WORKERS
    return Feeding(batch, threads, f"using {hw.describe()}: {precision}, batch {batch}, {threads} decode threads")
