"""Backbone deltas travel in the narrowest dtype that holds them exactly: FedMomentum's ``residual_dtype`` residual
at 2 bytes a value on Flower, as the simulation counts it, and every node still ends with the server's model."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedmomentum import checkpoint, driver, simulation
from fedmomentum.flower import make_client_app, wire
from fedmomentum.records import read_metrics as rows
from fedmomentum.types import LowRank
from flower_helpers import FLOWER, LocalGrid, assert_same_state, node_backbone, run_local

NPY_HEADER = 128  # np.save's header for a matrix (README and docs/flower.md: "a 128-byte npy header per array")


def _npy(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize("dtype, size", [(torch.bfloat16, 2), (torch.float16, 2), (torch.float32, 4)])
def test_a_delta_travels_in_the_narrowest_exact_dtype(dtype, size):
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(6, 3, generator=generator).to(dtype).float()  # exactly representable in ``dtype``
    array = wire.delta_array(values)
    assert array.dtype == str(dtype).removeprefix("torch.")
    assert len(array.data) == NPY_HEADER + size * values.numel()
    back = wire.decode_delta(array, "x")
    assert back.dtype == torch.float32 and torch.equal(back.view(torch.int32), values.view(torch.int32))  # bits


def test_bfloat16_keeps_what_float16_cannot():
    """Tiny and huge magnitudes (outside float16's range) and float32 subnormals with a short mantissa."""
    values = torch.tensor([[1e-30, -3e35], [2.0 ** -130, 0.0]]).to(torch.bfloat16).float()  # 2^-130: subnormal
    assert values[1, 0] == 2.0 ** -130 and values[0, 0] != 0
    array = wire.delta_array(values)
    assert array.dtype == "bfloat16"
    assert torch.equal(wire.decode_delta(array, "x").view(torch.int32), values.view(torch.int32))
    just_off = values + torch.tensor([[0.0, 0.0], [0.0, 1.0 + 2.0 ** -20]])  # 21 significant bits: float32
    assert wire.delta_array(just_off).dtype == "float32"


def _bad_arrays() -> dict[str, tuple[Array, str]]:
    good = np.ones((4, 3), np.uint16)
    body = _npy(good)
    return {
        "tag": (Array(dtype="int16", shape=(4, 3), stype=wire.NUMPY, data=body), "dtype tag 'int16'"),
        "short": (Array(dtype="bfloat16", shape=(4, 3), stype=wire.NUMPY, data=body[:-2]),
                  "22 bytes of values, a .4, 3. bfloat16 array takes 24"),
        "declared-20gb": (Array(dtype="bfloat16", shape=(100_000, 100_000), stype=wire.NUMPY, data=body),
                          "152 bytes, a .100000, 100000. bfloat16 array takes 20000000000 plus an npy header"),
        "declared-shape": (Array(dtype="bfloat16", shape=(4, 4), stype=wire.NUMPY, data=body), "header says"),
        "header-dtype": (Array(dtype="bfloat16", shape=(4, 3), stype=wire.NUMPY,
                               data=_npy(np.ones((4, 3), np.float16))), "header says"),
        "header-shape": (Array(dtype="bfloat16", shape=(4, 3), stype=wire.NUMPY,
                               data=_npy(np.ones((3, 4), np.uint16))), "header says"),
        "vector": (Array(dtype="float32", shape=(12,), stype=wire.NUMPY, data=_npy(np.ones(12, np.float32))),
                   "a delta's factor is a matrix"),
        "raw": (Array(dtype="float32", shape=(4, 3), stype="raw", data=np.ones((4, 3), np.float32).tobytes()),
                "not an npy-encoded Array"),
        "nan": (Array(dtype="bfloat16", shape=(4, 3), stype=wire.NUMPY, data=_npy(np.full((4, 3), 0x7FC0, np.uint16))),
                "NaN or Inf"),
    }


@pytest.mark.parametrize("fault", list(_bad_arrays()))
def test_a_malformed_delta_is_refused_with_its_reason(fault):
    array, reason = _bad_arrays()[fault]
    record = ArrayRecord({"0/model.layers.0.self_attn.q_proj/L": array,
                          "0/model.layers.0.self_attn.q_proj/R": wire.delta_array(torch.ones(3, 5))})
    with pytest.raises(ValueError, match=f"backbone array '0/model.layers.0.self_attn.q_proj/L'.*{reason}"):
        wire.record_to_deltas(record)


def test_factors_of_different_inner_sizes_are_refused():
    record = wire.deltas_to_record({0: {"layer": LowRank(torch.ones(4, 2), torch.ones(3, 5))}})
    with pytest.raises(ValueError, match="not the factors of one product"):
        wire.record_to_deltas(record)


def test_a_bfloat16_residual_is_sent_at_two_bytes_and_every_node_ends_with_the_servers_model(tmp_path, small_config):
    """FedMomentum with ``residual_dtype = "bfloat16"`` on Flower (in process, Flower's wire format): the same model
    as ``fedmomentum run`` bit for bit, on the server and on every node; what round 2's messages carry, measured,
    is the simulation's round-1 ``downlink_bytes`` (adapter at 4 bytes a value, residual at 2) plus one npy header
    per array."""
    changes = {**FLOWER, "method": "fedmomentum", "method_options": {"residual_dtype": "bfloat16"}}
    reference = small_config(tmp_path / "sim", **changes)
    simulation.run(reference, quiet=True)
    config = small_config(tmp_path / "flower", **changes)
    grid = LocalGrid(make_client_app(), [0, 1], 2, run_id=21)
    strategy = run_local(config, grid)
    assert_same_state(tmp_path / "sim" / driver.CHECKPOINT, tmp_path / "flower" / driver.CHECKPOINT, atol=0.0)

    sim_rows, flower_rows = rows(tmp_path / "sim"), rows(tmp_path / "flower")
    delta = strategy.backbone_log.deltas[0]  # round 1's residual: what round 2's messages carry besides the adapter
    assert delta and all(wire.delta_array(d.left).dtype == "bfloat16" and wire.delta_array(d.right).dtype ==
                         "bfloat16" for d in delta.values())
    layers = len(checkpoint.load(tmp_path / "flower" / driver.CHECKPOINT)[0].lora)
    arrays = 2 * layers + 2 * len(delta)  # A and B of every layer (both moved), L and R of every residual
    assert flower_rows[2]["resyncs"] == 0 and flower_rows[2]["method_downlink_bytes"] == sim_rows[2]["downlink_bytes"]
    assert flower_rows[1]["method_downlink_bytes"] == sim_rows[1]["downlink_bytes"]
    assert flower_rows[2]["downlink_bytes"] == sim_rows[1]["downlink_bytes"] + NPY_HEADER * arrays
    residual_values = sum(d.left.numel() + d.right.numel() for d in delta.values())
    as_float32 = sim_rows[1]["downlink_bytes"] + 2 * residual_values + NPY_HEADER * arrays
    assert flower_rows[2]["downlink_bytes"] < as_float32  # what it cost before: the residual at 4 bytes a value

    server = checkpoint.load(tmp_path / "flower" / driver.CHECKPOINT)[0].backbone
    for node_id, context in grid.contexts.items():  # each trained round 2 on version 1; round 2's delta comes next
        rebuilt = node_backbone(context, config, extra=strategy.backbone_log.deltas[1])
        assert server.keys() <= rebuilt.keys()
        assert all(torch.equal(rebuilt[k], server[k]) for k in server), node_id
