"""The message contract's tensor packing: a state dict travels as two raw-bytes arrays (a handful of Flower
objects instead of one per tensor, each a request between SuperLink, SuperNode and ClientApp) and comes
back bit for bit, whatever the dtypes and shapes."""

import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from papm.client.records import pack_arrays, record_state, state_record, unpack_arrays
from papm.shared.models import build_model, model_args


def test_a_state_dict_comes_back_bit_for_bit_with_its_dtypes_and_shapes():
    model = build_model(model_args(10, 3, 0.25))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    state = model.state_dict()
    back = record_state(state_record(state))
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    odd = {"scalar": torch.tensor(7, dtype=torch.int64), "empty": torch.zeros(0, 3), "f64": torch.rand(2, 2, dtype=torch.float64),
           "flag": torch.tensor([True, False]), "half": torch.rand(3, dtype=torch.float16)}
    back = unpack_arrays(pack_arrays(odd))
    for k, v in odd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k


def test_a_model_message_is_a_handful_of_flower_objects_not_one_per_tensor():
    state = build_model(model_args(10, 3, 0.25)).state_dict()
    assert len(state) > 100
    content = RecordDict({"model": state_record(state)})  # a message's content: what travels as objects
    assert len(get_all_nested_objects(content)) <= 6


def test_an_unpacked_record_with_one_array_per_tensor_still_reads():
    t = {"w": torch.rand(2, 3), "n": torch.tensor(3)}
    legacy = ArrayRecord({k: Array(v.numpy()) for k, v in t.items()})
    back = unpack_arrays(legacy)
    assert all(torch.equal(back[k], v) for k, v in t.items())
