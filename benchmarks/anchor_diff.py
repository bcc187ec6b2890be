"""Issue 11: why the anchor's effect SQNR in the shared ``anchor-fit`` graph differs from its own compile.

Run: ``.venv/bin/python benchmarks/anchor_diff.py [PROFILE]`` (default ``anchor-fit``; bundled tiny U-Net,
its trained LoRAs, anchor ``sepia``, bench_align's options: 16 calibration feeds, 8 held-out evaluation
feeds). Builds the anchor compiled alone and all tasks in one graph, lists what differs in the plans,
then edits the QDQ graphs in memory: ``float``: the Q/DQ pairs on some activations removed (how much of
the anchor's effect error their 16-bit rounding makes); ``own``: the anchor's own activation encodings on the
tensors where the shared ones differ; ``bypass``: the Q/DQ pairs on other tasks' LoRA-branch tensors
(which the own graph does not have) removed; and prints the anchor's effect / output SQNR of each
variant and how far each quantized output is from the own compile's.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable

import numpy as np
import onnx_graphsurgeon as gs
from _common import ROOT

sys.path.insert(0, str(ROOT))

from quadc.align.api import EVAL_SEED_OFFSET  # noqa: E402
from quadc.align.evaluate import Evaluator  # noqa: E402
from quadc.align.workspace import Workspace, build_workspace  # noqa: E402
from quadc.compiler import bundled_loras  # noqa: E402
from quadc.quant.affine import sqnr_db  # noqa: E402
from quadc.quant.calibrate import clone_graph  # noqa: E402
from quadc.quant.feeds import random_feeds  # noqa: E402

ANCHOR = "sepia"


def _options(**extra: str) -> dict:
    return {"quant-plan": {"lora_policy": "anchor", "calib_seed": 0, "calib_random": 16, **extra}}


def _qdq(graph: gs.Graph, name: str) -> tuple[gs.Tensor, gs.Node, list[gs.Node]]:
    tensor = graph.tensors()[name]
    (q,) = [n for n in tensor.outputs if n.op == "QuantizeLinear"]
    return tensor, q, list(q.outputs[0].outputs)


def edited(shared: Workspace, own: Workspace, set_own: Iterable[str], bypass: Iterable[str]) -> Workspace:
    """``shared`` with the own compile's encodings on ``set_own`` and no Q/DQ on ``bypass``."""
    g = clone_graph(shared.qdq_graph)
    for name in set_own:
        enc = own.plan.activations[name]
        _, q, dqs = _qdq(g, name)
        for node in (q, *dqs):
            node.inputs[1] = gs.Constant(node.inputs[1].name + "_own", np.array(enc.scale, np.float32))
            node.inputs[2] = gs.Constant(node.inputs[2].name + "_own",
                                         np.array(enc.zero_point, node.inputs[2].values.dtype))
    tensors = g.tensors()
    for name in bypass:
        if name not in tensors or not any(n.op == "QuantizeLinear" for n in tensors[name].outputs):
            continue  # an activation qdq-insert left unquantized (a graph input read only as an index)
        tensor, _, dqs = _qdq(g, name)
        for dq in dqs:
            out = dq.outputs[0]
            for consumer in list(out.outputs):
                for k, i in enumerate(consumer.inputs):
                    if i is out:
                        consumer.inputs[k] = tensor
            g.outputs = [tensor if o is out else o for o in g.outputs]
    g.cleanup().toposort()
    return dataclasses.replace(shared, qdq_graph=g)


def _flat(outputs: list[list[np.ndarray]]) -> np.ndarray:
    return np.concatenate([np.asarray(o, np.float64).ravel() for run in outputs for o in run])


def main() -> int:
    profile = sys.argv[1] if len(sys.argv) > 1 else "anchor-fit"
    loras = {k: str(v) for k, v in bundled_loras().items()}
    own = build_workspace(None, {ANCHOR: loras[ANCHOR]}, pass_options=_options())
    shared = build_workspace(None, loras, pass_options=_options(activation_profile=profile))
    mine, theirs = own.plan.activations, shared.plan.activations
    differ = sorted(n for n in mine if mine[n] != theirs[n])
    extra = sorted(set(theirs) - set(mine))
    same_w = sum(own.plan.weights[n] == shared.plan.weights.get(n) for n in own.plan.weights)
    same_l = sum(own.plan.lora[n] == shared.plan.lora.get(n) for n in own.plan.lora)
    print(f"profile {profile}: activations own {len(mine)}, shared {len(theirs)}; {len(differ)} differ, "
          f"{len(extra)} only in the shared graph (other tasks' LoRA branches); weights equal {same_w}/"
          f"{len(own.plan.weights)}, anchor's LoRA slot encodings equal {same_l}/{len(own.plan.lora)}")
    for n in differ:
        print(f"  {n}: own {own.plan.ranges[n]} shared {shared.plan.ranges[n]}")
    feeds = random_feeds(shared.float_graph, 8, seed=EVAL_SEED_OFFSET)
    ref = Evaluator(own, feeds)
    lora = own.loras[ANCHOR]
    q_own = _flat(ref.quant_outputs(lora))
    eff_own = q_own - _flat(ref.quant_outputs(None))
    print(f"{'variant':<44}{'effect':>9}{'output':>9}{'out vs own':>12}{'effect vs own':>15}")
    print(f"{'own compile':<44}{ref.scores(lora)['effect_sqnr_db']:9.4f}{ref.scores(lora)['output_sqnr_db']:9.4f}")
    sums = [n for n in extra if n.endswith("/sum")]
    for label, base, set_own, bypass in (
            ("own, every activation float", own, [], list(mine)),
            (f"own, the {len(differ)} differing float", own, [], differ),
            (f"shared, the {len(differ)} differing float", shared, [], differ),
            ("shared as compiled", shared, [], []),
            (f"own encodings on the {len(differ)} differing", shared, differ, []),
            (f"bypass the {len(sums)} other-task LoRA sums", shared, [], sums),
            (f"bypass all {len(extra)} other-task branch tensors", shared, [], extra),
            ("both", shared, differ, extra)):
        ws = edited(base, own, set_own, bypass)
        ev = Evaluator(ws, feeds)
        s = ev.scores(shared.loras[ANCHOR])
        q = _flat(ev.quant_outputs(shared.loras[ANCHOR]))
        eff = q - _flat(ev.quant_outputs(None))
        print(f"{label:<44}{s['effect_sqnr_db']:9.4f}{s['output_sqnr_db']:9.4f}{sqnr_db(q_own, q):12.2f}"
              f"{sqnr_db(eff_own, eff):15.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
