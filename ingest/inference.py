"""ResNet50 on OpenVINO: the forward pass of every load and query on a processor.

`OpenVinoExtractor` compiles the cached IR (ingest/ir_cache.py) for the processor at the collection's precision,
which must be asked for: the CPU plugin computes in bf16 by default where the processor can, so fp32 is requested
explicitly (INFERENCE_PRECISION_HINT f32). For loads it is compiled for throughput, and `embed` spreads a batch over
an AsyncInferQueue of as many infer requests as OpenVINO finds best (one per stream: the cores split between them);
for queries, for latency (one stream on every core: one picture in half the time).
Nothing here imports TensorFlow once the IR is cached: a cold query costs well under a second of model start-up.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ingest.errors import RisError, WeightsError, first_line
from ingest.features import RAW_DIMS, parse_weights

OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}  # ours -> INFERENCE_PRECISION_HINT


def load_openvino():
    """The openvino module, or one line saying it cannot be had."""
    try:
        import openvino

        openvino.Core()
    except Exception as e:  # ImportError, a shared library that does not load, a plugin that does not start
        raise RisError(f"OpenVINO cannot be loaded ({first_line(str(e)) or type(e).__name__}); reinstall it "
                       f"(pip install openvino) or pass --runtime tensorflow") from None
    return openvino


class OpenVinoExtractor:
    """The collection's ResNet50 compiled by OpenVINO for this processor at one precision ('fp32' or 'bf16');
    features float32. The same interface as ingest.features.FeatureExtractor: weights, precision, runtime,
    fingerprint (the Keras model's, from the IR's metadata) and embed. `threads` caps the inference threads
    (INFERENCE_NUM_THREADS; None: every core); `latency` compiles for one picture at a time."""

    runtime = "openvino"

    def __init__(self, weights: str, precision: str = "fp32", *, models_dir: Path, threads: int | None = None,
                 latency: bool = False):
        ov = load_openvino()
        from ingest.ir_cache import cached_ir

        if precision not in OPENVINO_PRECISIONS:
            raise WeightsError(f"an extractor runs at fp32 or bf16, not {precision!r}")
        self.weights = parse_weights(weights)
        self.precision = precision
        ir = cached_ir(models_dir, self.weights)
        self.fingerprint = ir.fingerprint
        self.ir_path = ir.files.xml
        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY" if latency else "THROUGHPUT",
                  "INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision]}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(core.read_model(ir.xml, ir.bin), "CPU", config)
        self.requests = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self.queue = ov.AsyncInferQueue(self.compiled, self.requests)
        self.queue.set_callback(collect)
        self.lock = threading.Lock()  # one batch at a time through the queue (a web server's threads share it)

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """(n, 224, 224, 3) uint8 RGB -> (n, 2048) float32: the batch cut into one slice per infer request, run at once."""
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        out = np.empty((len(pixels), RAW_DIMS), np.float32)
        step = -(-len(pixels) // self.requests)
        with self.lock:
            for start in range(0, len(pixels), step):
                self.queue.start_async(pixels[start : start + step], (out, start))
            self.queue.wait_all()
        return out

    def describe(self) -> str:
        streams = self.compiled.get_property("NUM_STREAMS")
        threads = self.compiled.get_property("INFERENCE_NUM_THREADS")
        return f"OpenVINO {self.precision}, {streams} stream(s), {threads} thread(s), {self.requests} infer request(s)"


def collect(request, userdata) -> None:
    """AsyncInferQueue callback: copy a finished slice's features into its place in the batch's output."""
    out, start = userdata
    result = request.get_output_tensor(0).data
    out[start : start + len(result)] = result
