"""``qnn-div-const`` (golden cases in golden_graphs/qnn-div-const): on the bundled VAE decoder it rewrites
every division by a constant and keeps the numbers to float32 rounding; on the HTP backend a QDQ graph
with ``Div(x, 0.5)`` does not finalize, and the same graph after the pass compiles and matches the CPU."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from quadc.graph import load_model, to_model_bytes
from quadc.passes import get_pass
from quadc.passes.patterns import const_value
from quadc.pipeline import defaults
from quadc.quant.affine import sqnr_db
from quadc.runtime.qnn_engine import qnn_available
from quadc.testing import apply_pass_and_basic_check, assert_op_count_match


def test_rewrites_the_bundled_vae_decoders_divisions() -> None:
    graph = load_model(defaults.data_dir() / "tiny_vae_decoder.onnx")
    constant = [n for n in graph.nodes if n.op == "Div" and const_value(n.inputs[1]) is not None]
    assert len(constant) == 10  # latent / scaling_factor and nine output-scale divisions by 1
    divs = sum(n.op == "Div" for n in graph.nodes)
    muls = sum(n.op == "Mul" for n in graph.nodes)
    out, result = apply_pass_and_basic_check(graph, "qnn-div-const", numeric=True, rtol=1e-5)
    assert result.counts == {"rewritten": 10}
    assert_op_count_match(out, {"Div": divs - 10, "Mul": muls + 10})
    again, second = apply_pass_and_basic_check(out, "qnn-div-const", numeric=True, rtol=0.0)
    assert second.counts == {"rewritten": 0}


def _div_model(divisor: float) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"]),
             helper.make_node("Div", ["h", "c"], ["d"]),
             helper.make_node("Conv", ["d", "w2", "b2"], ["y"], pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(rng.standard_normal((16, 4, 1, 1)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b1"),
             numpy_helper.from_array(np.array(divisor, np.float32), "c"),
             numpy_helper.from_array(0.1 * rng.standard_normal((16, 16, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b2")]
    graph = helper.make_graph(nodes, "div", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.skipif(not qnn_available()[0], reason=f"QNN HTP backend: {qnn_available()[1]}")
def test_division_by_a_constant_compiles_on_htp_only_after_the_pass() -> None:
    import onnxruntime as ort
    from test_qdq_insert import make_plan, qdq, run

    from quadc.context import CompileContext
    from quadc.runtime.qnn_engine import htp_provider_options, htp_session_options

    def htp(graph: gs.Graph):
        return ort.InferenceSession(to_model_bytes(graph), htp_session_options(htp_provider_options(), strict=True))

    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(9)]
    plain = gs.import_onnx(_div_model(0.5))
    qdq(plain, make_plan(plain, feeds[:8]))
    with pytest.raises(Exception, match="finalize"):
        htp(plain)
    legal = gs.import_onnx(_div_model(0.5))
    plan = make_plan(legal, feeds[:8])  # calibrated before the pass, as in the qnn pipeline
    get_pass("qnn-div-const").run(legal, CompileContext())
    assert_op_count_match(legal, {"Div": 0, "Mul": 1})
    qdq(legal, plan)
    on_cpu = run(legal, feeds[8])[0]  # the same QDQ graph on onnxruntime's CPU provider
    assert sqnr_db(on_cpu, htp(legal).run(None, feeds[8])[0]) > 35.0
