"""INT8 static quantisation of exported ONNX graphs with onnxruntime.quantization.

QDQ format (QuantizeLinear/DequantizeLinear pairs around each quantised op, the form
ONNX Runtime's CPU and GPU providers fuse into integer kernels), per-channel weight
scales (pruned convolutions have very different channel ranges), activation ranges
calibrated on the device's own local training images: never on test data. Activations
are unsigned 8-bit by default (U8S8: ONNX Runtime's x86 kernels favour it), signed on
request; weights are 7-bit (``reduce_range``) on x86 CPUs without VNNI.

Torch-free: the Flower client can quantise right after export, and a coordinator
without torch could too.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ..shared.errors import PapmError

CALIB_BATCH = 32


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over an in-memory array."""

    def __init__(self, input_name: str, x: np.ndarray, batch_size: int = CALIB_BATCH):
        self.input_name = input_name
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.batch_size = batch_size
        self._it: Iterator[dict] | None = None

    def _batches(self) -> Iterator[dict]:
        for i in range(0, len(self.x), self.batch_size):
            yield {self.input_name: self.x[i : i + self.batch_size]}

    def get_next(self) -> dict | None:
        if self._it is None:
            self._it = self._batches()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None


ACTIVATION_TYPES = ("u8", "s8")


def int8_settings(activations: str = "u8", reduce_range: bool | None = None) -> dict:
    """How a graph is quantised: activation type and 7-bit weights (``reduce_range``, default: u8 activations
    on a CPU without VNNI, see ``shared/cpu.py``: in a run every device quantises its own part, so it is
    decided where the part runs), with the CPU it was decided on (recorded in the manifest)."""
    from ..shared.cpu import cpu_features, reduce_range_needed

    if activations not in ACTIVATION_TYPES:
        raise PapmError(f"int8 activations must be u8 or s8, got {activations!r}")
    if reduce_range is None:  # only unsigned activations saturate; the machine that quantises decides
        reduce_range = activations == "u8" and reduce_range_needed()
    return {"activations": activations, "weights": "s8", "reduce_range": bool(reduce_range),
            "decided_on": cpu_features()["isa"]}


def quantize_int8(fp32_path: Path | str, out_path: Path | str, calibration: np.ndarray, activations: str = "u8",
                  reduce_range: bool | None = None) -> Path:
    """Write an INT8 (QDQ, per-channel) copy of ``fp32_path`` calibrated on ``calibration``.

    ``calibration``: float32 (N, ...) inputs exactly as the graph sees them (normalised
    images for parts and the base model), drawn from the local training data.
    ``activations``: ``u8`` (unsigned 8-bit activations: what ONNX Runtime's x86 integer kernels
    run fastest, measured 2.3x faster than ``s8`` on an AVX512-VNNI CPU) or ``s8``.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    settings = int8_settings(activations, reduce_range)
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if len(calibration) == 0:
        raise PapmError(f"no calibration data for {fp32_path.name}; INT8 needs some of the device's training images")
    import onnx

    input_name = onnx.load(str(fp32_path)).graph.input[0].name  # the image: torch.onnx keeps initializers out of the inputs
    out_path.parent.mkdir(parents=True, exist_ok=True)
    quiet = logging.getLogger().level
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        staged = Path(tmp) / "int8.onnx"
        # shape inference + graph cleanup first: the quantiser needs shapes, as its docs recommend
        with contextlib.redirect_stdout(io.StringIO()):
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
            logging.getLogger().setLevel(logging.ERROR)  # the quantiser logs advice on the root logger
            try:
                quantize_static(
                    str(pre),
                    str(staged),
                    _Reader(input_name, calibration),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8 if settings["activations"] == "u8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    reduce_range=settings["reduce_range"],
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
                )
            finally:
                logging.getLogger().setLevel(quiet)
        staged.replace(out_path)  # same folder: an atomic rename
    return out_path
