"""The llama.cpp layer tap (acd_engine.backends.llamacpp.gate) on hand-built ggml tensors: runs in
CI, where llama.cpp itself is not installed (tests/engine/test_llamacpp.py checks the tap on
the real graph against the engine's own gate features)."""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import numpy as np
import pytest

from acd_engine.backends.llamacpp.gate import GGML_TYPE_F32, GgmlTensor, LayerTap

# llama_cpp.ggml_backend_sched_eval_callback, declared as llama-cpp-python declares it
FAKE_LIB = SimpleNamespace(
    ggml_backend_sched_eval_callback=ctypes.CFUNCTYPE(
        ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p
    )
)


class Node:
    """A ggml tensor header over a numpy ``[T, H]`` fp32 matrix, as the callback sees it."""

    def __init__(self, name: str, values: np.ndarray, dtype: int = GGML_TYPE_F32) -> None:
        self.values = np.ascontiguousarray(values, dtype=np.float32)  # kept alive
        t = self.header = GgmlTensor()
        t.type = dtype
        t.ne[0], t.ne[1], t.ne[2], t.ne[3] = values.shape[1], values.shape[0], 1, 1
        t.nb[0], t.nb[1] = 4, 4 * values.shape[1]
        t.data = self.values.ctypes.data
        t.name = name.encode()

    @property
    def address(self) -> int:
        return ctypes.addressof(self.header)


def run_graph(tap: LayerTap, nodes: list[Node]) -> list[str]:
    """Drive ``tap`` as ggml's scheduler does; return the names computed before it stopped."""
    computed = []
    for node in nodes:
        need = tap.callback(node.address, True, None)
        computed.append(node.header.name.decode())
        if need and not tap.callback(node.address, False, None):
            break
    return computed


def graph(layers: int, tokens: int, hidden: int, offset: float = 0.0) -> list[Node]:
    rng = np.random.default_rng(0)
    nodes = []
    for i in range(layers):
        nodes.append(Node(f"attn_norm-{i}", rng.normal(size=(tokens, hidden))))
        nodes.append(Node(f"l_out-{i}", rng.normal(size=(tokens, hidden)) + offset + i))
    nodes.append(Node("result_output", rng.normal(size=(tokens, 7))))
    return nodes


def test_the_tap_copies_its_layers_in_the_gate_order_and_stops_after_the_deepest():
    nodes = graph(layers=6, tokens=5, hidden=4)
    tap = LayerTap(FAKE_LIB, [3, 1, 2])
    computed = run_graph(tap, nodes)
    assert computed[-1] == "l_out-3"  # nothing after the deepest wanted layer runs
    states = tap.states()
    assert [s.shape for s in states] == [(5, 4)] * 3
    by_name = {n.header.name.decode(): n.values for n in nodes}
    for state, layer in zip(states, [3, 1, 2], strict=True):
        np.testing.assert_array_equal(state, by_name[f"l_out-{layer}"])
    # a copy: the graph's buffers are reused by the next decode
    by_name["l_out-3"][:] = 0
    assert np.abs(states[0]).sum() > 0


def test_a_prompt_cut_into_ubatches_is_concatenated_in_order():
    tap = LayerTap(FAKE_LIB, [1])
    first, second = graph(3, tokens=4, hidden=2), graph(3, tokens=3, hidden=2, offset=100)
    run_graph(tap, first)
    run_graph(tap, second)
    (state,) = tap.states()
    assert state.shape == (7, 2)
    np.testing.assert_array_equal(state[:4], first[3].values)
    np.testing.assert_array_equal(state[4:], second[3].values)
    tap.reset()
    with pytest.raises(RuntimeError, match="a wanted layer was never computed"):
        tap.states()


def test_a_tensor_that_is_not_fp32_is_reported_not_misread():
    tap = LayerTap(FAKE_LIB, [0])
    bad = Node("l_out-0", np.zeros((2, 3)), dtype=1)  # GGML_TYPE_F16
    assert run_graph(tap, [bad, Node("l_out-1", np.zeros((2, 3)))]) == ["l_out-0"]
    with pytest.raises(RuntimeError, match="l_out-0 is not a contiguous fp32"):
        tap.states()
