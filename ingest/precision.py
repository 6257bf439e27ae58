"""How the CNN runs: on which runtime (OpenVINO or TensorFlow), at which precision (fp32 or bf16), on what.

Every forward pass on a processor runs on OpenVINO; TensorFlow defines and converts the model (ingest/ir_cache.py),
fine-tunes it, and runs it on NVIDIA GPUs. `--runtime auto` picks accordingly (`choose_runtime`).
bf16 roughly halves the work of each multiply where the hardware does it natively (AVX512_BF16 or AMX on
the processor, a GPU of compute capability 8.0 or more) and is slower than fp32 where it is emulated, so
`auto` asks the hardware. A collection records the precision its vectors were made at: `auto` then means
the collection's own, and only a new collection is decided by the hardware (`choose`).
How a load is fed on that hardware (batch size, decode threads) is ingest/feeding.py.
Nothing here imports TensorFlow unless the machine has an NVIDIA GPU (whose compute capability only it reports).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from ingest.errors import RisError, WeightsError

PRECISIONS = ("auto", "fp32", "bf16")
RUNTIMES = ("auto", "openvino", "tensorflow")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one folder per GPU the NVIDIA driver drives
GPU_BF16_CAPABILITY = (8, 0)  # Ampere and later compute bf16 natively


@dataclass(frozen=True)
class Hardware:
    """What `auto` and a load's feeding (ingest/feeding.py) are decided from."""

    cpu_bf16: bool = False  # the processor computes bf16 natively (as OpenVINO reports it; else its cpuinfo flags)
    gpus: tuple[str, ...] = ()  # NVIDIA GPUs the driver lists
    gpu_bf16: bool = False

    @property
    def native_bf16(self) -> bool:
        return self.gpu_bf16 if self.gpus else self.cpu_bf16

    def describe(self) -> str:
        if self.gpus:
            return f"GPU {', '.join(self.gpus)}" + ("" if self.gpu_bf16 else " (no native bf16)")
        return "processor with AVX512_BF16/AMX" if self.cpu_bf16 else "processor without native bf16"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The processor's feature flags (empty where /proc/cpuinfo does not exist, e.g. macOS)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.partition(":")[2].split()}


@functools.cache
def openvino_cpu_bf16() -> bool | None:
    """Whether OpenVINO's CPU plugin computes bf16 here (its OPTIMIZATION_CAPABILITIES), None if it cannot load."""
    try:
        import openvino

        return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # a missing or broken OpenVINO: ingest.inference says so when it is needed
        return None


def nvidia_gpus(root: Path = NVIDIA_GPUS) -> tuple[str, ...]:
    """The model name of each GPU the NVIDIA driver lists (its /proc files), read without starting CUDA."""
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return ()
    names = []
    for folder in folders:
        try:
            info = (folder / "information").read_text()
        except OSError:
            info = ""
        model = next((line.partition(":")[2].strip() for line in info.splitlines() if line.startswith("Model:")), "")
        names.append(model or folder.name)
    return tuple(names)


def gpu_capabilities_bf16() -> bool:
    """Every GPU TensorFlow sees computes bf16 natively; TensorFlow is what runs on them, so asking it costs nothing extra."""
    from ingest.features import quiet_tensorflow

    tf = quiet_tensorflow()
    gpus = tf.config.list_physical_devices("GPU")
    capabilities = [tf.config.experimental.get_device_details(g).get("compute_capability") or (0, 0) for g in gpus]
    return bool(gpus) and all(tuple(c) >= GPU_BF16_CAPABILITY for c in capabilities)


def hardware() -> Hardware:
    """The processor's bf16 support and the NVIDIA GPUs. The one place that looks; tests replace it."""
    cpu_bf16 = openvino_cpu_bf16()
    if cpu_bf16 is None:
        cpu_bf16 = any(flag in cpu_flags() for flag in CPU_BF16_FLAGS)
    gpus = nvidia_gpus()
    return Hardware(cpu_bf16=cpu_bf16, gpus=gpus, gpu_bf16=bool(gpus) and gpu_capabilities_bf16())


def check(precision: str) -> str:
    """The precision, if it is one of PRECISIONS (the library's callers do not pass through Click's choice)."""
    if precision not in PRECISIONS:
        raise RisError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def choose(requested: str, recorded: str | None, hw: Hardware | None = None) -> str:
    """fp32 or bf16 for a load: as asked; for `auto`, the collection's recorded precision if it exists,
    else bf16 where the hardware computes it natively. `hw` is looked up only when needed."""
    if check(requested) != "auto":
        return requested
    if recorded is not None:
        return recorded
    return "bf16" if (hw or hardware()).native_bf16 else "fp32"


def choose_runtime(requested: str, precision: str, hw: Hardware | None = None) -> str:
    """'openvino' or 'tensorflow' for a forward pass at `precision`: as asked; for `auto`, TensorFlow on NVIDIA
    GPUs, OpenVINO on processors, except bf16 on a processor OpenVINO computes no bf16 on (TensorFlow emulates it,
    so a bf16 collection stays bf16 wherever it is queried). OpenVINO asked for bf16 there is refused."""
    if requested not in RUNTIMES:
        raise RisError(f"runtime must be one of {', '.join(RUNTIMES)}, got {requested!r}")
    if requested == "tensorflow":
        return requested
    hw = hw or hardware()
    if requested == "auto":
        return "tensorflow" if hw.gpus or (precision == "bf16" and not hw.cpu_bf16) else "openvino"
    if precision == "bf16" and not hw.cpu_bf16:
        raise RisError("OpenVINO computes bf16 only on processors that do it natively (AVX512_BF16, AMX), and this one "
                       "does not; use --runtime tensorflow (emulated, slower) or --precision fp32 for a new collection")
    return "openvino"


def check_precision(precision: str, *, collection: str, recorded: str, remedy: str) -> None:
    """Refuse a precision other than the one a collection's vectors were made at: loads never mix the two."""
    if precision != recorded:
        raise WeightsError(f"collection {collection!r} was built at {recorded} precision, not {precision} "
                           f"(--precision auto uses the collection's own); {remedy}")


def plan_load(db, name: str, requested: str) -> tuple[str, Hardware]:
    """The precision of a load into collection `name`, and the hardware it was decided on, refusing at once (before
    a model is built or an archive unpacked) a precision other than the one an existing collection was built at."""
    from ingest import store

    with db.connect() as conn:
        row = store.find_row(conn, name)
    recorded = row.precision if row is not None else None
    hw = hardware()
    precision = choose(requested, recorded, hw)
    if recorded is not None:
        check_precision(precision, collection=name, recorded=recorded, remedy="use another --collection for other vectors")
    return precision, hw
