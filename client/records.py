"""Translation between the pure-PyTorch objects and Flower records.

The message contract of the ClientApp: the server (which sends to the client) and the
client both use this module, so a payload is packed and unpacked by the same code.
``shared/`` never imports Flower; this is where PyTorch meets Flower's records.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ..shared.config import RunConfig
from ..shared.errors import PapmError


# Every tensor of a state dict as its own Array made every message hundreds of Flower objects, each
# pulled and pushed by its own request between SuperLink, SuperNode and ClientApp process (measured on
# loopback: 6-7 s of a 9 s exchange moving ~200 objects of a width-0.25 ResNet). Packed, a state dict is
# two arrays: the tensors' bytes back to back (Flower cuts it into 5 MiB chunks) and their layout.
PACKED, LAYOUT = "packed", "layout"


def pack_arrays(tensors: dict[str, Any]) -> ArrayRecord:
    """Named tensors or arrays as one ArrayRecord of two raw-bytes arrays (see above)."""
    arrays = {k: np.asarray(torch.as_tensor(v).detach().cpu().numpy()) for k, v in tensors.items()}  # tobytes() is C order
    layout, offset = [], 0
    for k, a in arrays.items():
        layout.append([k, a.dtype.str, list(a.shape), offset])
        offset += a.nbytes
    data = b"".join(a.tobytes() for a in arrays.values())
    head = json.dumps(layout).encode()
    return ArrayRecord({PACKED: Array(dtype="uint8", shape=(len(data),), stype="raw-bytes", data=data),
                        LAYOUT: Array(dtype="uint8", shape=(len(head),), stype="raw-bytes", data=head)})


def unpack_arrays(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The tensors of ``pack_arrays`` (or of an ArrayRecord with one Array per tensor), each its own copy."""
    if set(record.keys()) != {PACKED, LAYOUT}:
        return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}
    data = bytes(record[PACKED].data)
    out = {}
    for k, dtype, shape, offset in json.loads(bytes(record[LAYOUT].data)):
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        a = np.frombuffer(data, dtype=dt, count=count, offset=offset).reshape(shape)
        out[k] = torch.from_numpy(a.copy())
    return out


# the names the handlers and phases use: a model's state dict, or any named tensors (sums, counts)
state_record = tensors_record = pack_arrays
record_state = unpack_arrays


def bytes_record(files: dict[str, bytes]) -> ArrayRecord:
    """Whole files (ONNX graphs) as raw-bytes arrays; Flower splits large arrays into chunks itself."""
    return ArrayRecord({k: Array(dtype="uint8", shape=(len(b),), stype="raw-bytes", data=bytes(b)) for k, b in files.items()})


def record_bytes(record: ArrayRecord) -> dict[str, bytes]:
    return {k: bytes(v.data) for k, v in record.items()}


def json_config(**values: Any) -> ConfigRecord:
    """Nested values (model_args, class lists) travel as JSON strings in a ConfigRecord."""
    return ConfigRecord({k: json.dumps(v) for k, v in values.items()})


def config_json(record: ConfigRecord, key: str) -> Any:
    if key not in record:
        raise PapmError(f"message lacks {key!r}; server and client versions differ")
    return json.loads(record[key])


def run_config_record(cfg: RunConfig) -> ConfigRecord:
    return ConfigRecord(cfg.to_flower())


def record_run_config(record: ConfigRecord) -> RunConfig:
    return RunConfig.from_mapping(dict(record), source="run config")


def message_content(cfg: RunConfig, **records: Any) -> RecordDict:
    """Every message carries the resolved run config, so nodes need nothing else."""
    return RecordDict({"run-config": run_config_record(cfg), **records})


def metrics(**values: float) -> MetricRecord:
    return MetricRecord({k: (float(v) if not isinstance(v, (int, list)) else v) for k, v in values.items()})
