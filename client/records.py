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


def state_record(state_dict: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in state_dict.items()})


def record_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def tensors_record(tensors: dict[str, Any]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(torch.as_tensor(v).detach().cpu().numpy())) for k, v in tensors.items()})


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
