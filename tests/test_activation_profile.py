"""The ``activation_profile`` option of quant-plan on the bundled tiny U-Net and its four trained LoRAs.

``anchor`` (QUAD's shared profile, what ``quadc align`` uses): the shared graph gives the anchor task the
encodings of the anchor compiled alone, and on onnxruntime the anchor's outputs are that compile's. The
reference is an independent compile (the anchor's LoRA only, default ``union`` profile), not the profile
code. ``union`` (the default): every task's ranges, which is why the anchor lost a little to its own
compile before (issue 11).
"""

from __future__ import annotations

import numpy as np
import pytest

from quadc.align.api import ALIGN_PROFILE, EVAL_SEED_OFFSET
from quadc.align.evaluate import Evaluator
from quadc.align.workspace import build_workspace
from quadc.compiler import bundled_loras
from quadc.errors import QuadcError
from quadc.quant.feeds import random_feeds


def _options(profile: str | None, **extra) -> dict:
    opts = {"lora_policy": "anchor", **extra}
    if profile:
        opts["activation_profile"] = profile
    return {"quant-plan": opts}


@pytest.fixture(scope="module")
def plans():
    loras = {k: str(v) for k, v in bundled_loras().items()}
    shared = {p: build_workspace(None, loras, pass_options=_options(p)) for p in ("union", "anchor", "anchor-fit")}
    anchor = shared["anchor"].anchor
    assert anchor is not None and anchor == shared["union"].anchor
    own = build_workspace(None, {anchor: loras[anchor]}, pass_options=_options(None))
    return shared, own, anchor


def test_anchor_profile_gives_the_anchor_its_own_compile_encodings(plans) -> None:
    shared, own, anchor = plans
    plan, alone = shared["anchor"].plan, own.plan
    assert set(alone.activations) < set(plan.activations)  # the shared graph has the other tasks' branches too
    differ = [n for n in alone.activations if plan.activations[n] != alone.activations[n]]
    assert not differ, differ[:5]
    assert all(plan.weights[n] == e for n, e in alone.weights.items())
    assert all(plan.lora[n] == e for n, e in alone.lora.items())
    # The cause of the old gap: under the union some of the anchor's activations get wider (coarser) grids.
    union = shared["union"].plan
    wider = [n for n in alone.activations
             if union.ranges[n][0] < alone.ranges[n][0] or union.ranges[n][1] > alone.ranges[n][1]]
    assert len(wider) > 20
    assert all(union.ranges[n][0] <= alone.ranges[n][0] and union.ranges[n][1] >= alone.ranges[n][1]
               for n in alone.activations)
    # Tensors the anchor's runs leave at zero (branches of layers only other tasks adapt) keep the union.
    only_shared = [n for n in plan.activations if n not in alone.activations]
    branches = [n for n in only_shared if n.endswith("/lora/up_out")]
    assert branches and all(plan.ranges[n] == union.ranges[n] and plan.ranges[n][1] > plan.ranges[n][0]
                            for n in branches)


def test_anchor_fit_keeps_the_union_only_where_a_task_would_clip(plans) -> None:
    shared, own, _ = plans
    fit, union, alone = shared["anchor-fit"].plan, shared["union"].plan, own.plan
    h = 2.0  # quant-plan's default 16-bit headroom

    def fits(outer, inner) -> bool:  # outer's calibrated values stay on inner's grid widened by h
        return outer[0] >= min(inner[0] * h, 0.0) and outer[1] <= max(inner[1] * h, 0.0)

    anchors = [n for n in alone.activations if fit.ranges[n] == alone.ranges[n] != union.ranges[n]]
    unions = [n for n in alone.activations if fit.ranges[n] == union.ranges[n] != alone.ranges[n]]
    assert anchors and unions and len(anchors) + len(unions) == sum(
        alone.ranges[n] != union.ranges[n] for n in alone.activations)
    assert all(fits(union.ranges[n], alone.ranges[n]) for n in anchors)
    assert not any(fits(union.ranges[n], alone.ranges[n]) for n in unions)
    assert fit.report["activation_profile"]["union_where_a_task_clips"] >= len(unions)


def test_the_anchor_in_the_shared_graph_computes_its_own_compile(plans) -> None:
    shared, own, anchor = plans
    feeds = random_feeds(own.float_graph, 2, seed=EVAL_SEED_OFFSET)
    ours = Evaluator(shared["anchor"], feeds).quant_outputs(shared["anchor"].loras[anchor])
    theirs = Evaluator(own, feeds).quant_outputs(own.loras[anchor])
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a[0], b[0], rtol=0, atol=1e-5 * float(np.abs(b[0]).max()))


def test_profile_is_recorded_and_read_back(plans, tmp_path) -> None:
    from quadc.quant.encodings import write_encodings
    from quadc.quant.plan_file import encodings_file_of, plan_from_encodings_file
    from quadc.quant.plan_options import PlanOptions

    shared, _, anchor = plans
    ws = shared["anchor"]
    assert ws.plan.summary()["activation_profile"] == "anchor"
    report = ws.plan.report["activation_profile"]
    assert report["profile"] == "anchor" and report["anchor"] == anchor and report["narrower"] > 0
    assert shared["union"].plan.summary()["activation_profile"] == "union"
    path = tmp_path / "encodings.json"
    write_encodings(path, encodings_file_of(ws.plan))
    back = plan_from_encodings_file(ws.float_graph, shared["anchor"].float_slots, PlanOptions(encodings_file=str(path)),
                                    lambda _: None)
    assert back.activation_profile == "anchor" and back.report["activation_profile"]["anchor"] == anchor
    assert back.activations == ws.plan.activations
    assert encodings_file_of(back).quantizer_args == encodings_file_of(ws.plan).quantizer_args


def test_unified_fallback_has_no_anchor_profile() -> None:
    loras = {k: str(v) for k, v in bundled_loras().items()}
    ws = build_workspace(None, loras, pass_options={"quant-plan": {"lora_policy": "unified",
                                                                   "activation_profile": "anchor"}})
    assert ws.plan.activation_profile == "union" and ws.plan.report["activation_profile"]["requested"] == "anchor"


def test_align_defaults_to_anchor_fit_unless_set() -> None:
    assert ALIGN_PROFILE == "anchor-fit"
    lora = {"sepia": str(bundled_loras()["sepia"])}
    ws = build_workspace(None, lora, pass_options=_options("union"), plan_defaults={"activation_profile": ALIGN_PROFILE})
    assert ws.plan.activation_profile == "union" and ws.pass_options["quant-plan"]["activation_profile"] == "union"
    with pytest.raises(QuadcError, match="activation_profile"):
        build_workspace(None, {}, pass_options={"quant-plan": {"activation_profile": "widest"}})
