"""``quadc align`` and ``quadc compile --align``: QUAD's distillation of every non-anchor LoRA under the
shared encodings, and the compile that follows it.

:func:`align` builds the workspace (:mod:`quadc.align.workspace`: the float teacher graph, the QDQ student
graph, the plan with every encoding), equalizes each non-anchor LoRA's rank components to the shared
grids (:mod:`quadc.align.equalize`: the same float LoRA, better quantized), trains it at ``level``
``layer`` or ``model`` (:mod:`quadc.align.objectives`, :mod:`quadc.align.trainer`; ``model`` first runs
the layer level and distills the whole network from there, as block-wise reconstruction before
end-to-end tuning usually is: the layer level is cheap and the model level then starts close), keeps each
aligned LoRA only where the quantized graph on onnxruntime gives it a higher effect SQNR than the original
on the validation share of the training feeds (``_keep_better``), measures every task before and after on
evaluation feeds that neither calibration nor training used (:mod:`quadc.align.evaluate`), and writes into
``out_dir`` (staged, renamed when complete):

    <task>.safetensors   each LoRA, aligned (the anchor as it was), diffusers format (quadc.align.files)
    encodings.json       the shared encodings (AIMET 1.0.0), the same a compile with these options writes
    report.json          per task: effect and output SQNR before/after, float SQNR, training curve, and
                         ``kept``: which LoRA the validation check kept

:func:`compile_aligned` is ``quadc compile --align LEVEL``: it aligns into ``<OUT>.align`` and compiles the
aligned files against ``<OUT>.align/encodings.json``, which is exactly what the two commands
``quadc align -o OUT.align`` and ``quadc compile --encodings OUT.align/encodings.json --lora ...`` do, so
the one-command artifact equals the two-command one and the manifest names the encodings file it used.
It is a stage in front of the compile, not a pass: the student must be the graph the *whole* pipeline
makes (``qdq-insert``'s options and anything after it included) while the teacher is the float graph
before ``quant-plan``, and no single point of the pipeline sees both.

The shared profile is the anchor's where it serves every task: unless ``--activation-profile`` says
otherwise, alignment plans with ``activation_profile=anchor-fit`` (:data:`ALIGN_PROFILE`): activation
ranges from the anchor's own calibration (base model + anchor), as QUAD's "the anchor's PTQ encodings serve
as the shared profile", except on the tensors where another task's calibrated values would clip even after
the headroom, which keep the union of every task's ranges. The pure profile (``anchor``: the anchor's graph
is exactly its own compile) clipped ``background_removal`` on the trained fixtures from 35.4 to 23.7 dB
effect SQNR, and neither level won it back (layer 23.7, model 27.4, against 37.6 compiled alone): the layer
level reconstructs one branch and never sees the clipping downstream, and the model level cannot make an
effect that needs 4-9x the anchor's range fit into it. ``quadc compile`` without ``--align`` keeps the
union (nothing trains a task to live with a narrower range there).

Training feeds: the ``--calib`` folder when given (the calibration feeds), else ``feeds`` synthetic
sampler-schedule feeds (:func:`quadc.quant.feeds.random_feeds`, seed ``calib_seed``). Evaluation feeds:
the ``eval_dir`` folder, else ``eval_feeds`` synthetic feeds with another seed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from quadc.context import silent_progress
from quadc.errors import QuadcError

__all__ = ["ALIGN_PROFILE", "LEVELS", "AlignOptions", "align", "compile_aligned"]

LEVELS = ("layer", "model")
LOSSES = ("effect", "output")
#: Seed offset of the synthetic evaluation feeds (never the training or calibration seed).
EVAL_SEED_OFFSET = 104_729
_BATCH = {"layer": 256, "model": 4}
#: The model level's Adam rate as a fraction of ``--lr``. Every factor of every slot moves at once there and
#: the errors add up through the whole network: at the layer level's rate (0.1 grid step) the validation loss
#: of the retrained ``inpaint`` fixture rose tenfold in the first 10 steps and early stopping ended the model
#: level at step 50 without a gain; at a tenth of it the model level trains for 160 steps and gains 2.2 dB.
_LR_RATIO = {"layer": 1.0, "model": 0.1}
#: The activation profile alignment plans with unless ``--activation-profile`` says otherwise.
ALIGN_PROFILE = "anchor-fit"


@dataclass(frozen=True)
class AlignOptions:
    """Options of :func:`align` (the CLI maps its flags one to one)."""

    level: str = "model"
    steps: int = 200
    batch: int | None = None      # samples per step: layer 256 rows, model 4 feeds
    lr: float = 0.1               # Adam step in shared-grid steps (quadc.align.trainer); model level: a tenth
    patience: int = 5
    eval_every: int | None = None
    feeds: int = 32               # synthetic training feeds without calib_dir
    eval_feeds: int = 8
    eval_dir: str | None = None
    rows: int = 512               # layer level: captured rows per slot
    data: str | None = None
    data_weight: float = 0.01
    loss: str = "effect"          # model level: "effect" (the task's own effect) or "output" (the whole output)
    warm_start: bool = True       # model level: start from the layer level's factors
    equalize: bool = True         # rescale rank components to the shared grids first (quadc.align.equalize)
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "cpu"
    threads: int | None = 1
    show_bar: bool = True

    def check(self) -> None:
        if self.level not in LEVELS:
            raise QuadcError(f"--level must be one of {', '.join(LEVELS)}, got '{self.level}'")
        for name in ("feeds", "eval_feeds", "rows"):
            if getattr(self, name) < 1:
                raise QuadcError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise QuadcError(f"the validation fraction must be in [0, 1), got {self.val_fraction}")
        if not (self.data_weight >= 0 and math.isfinite(self.data_weight)):
            raise QuadcError(f"--data-weight must be a non-negative number, got {self.data_weight}")
        from quadc.align.trainer import TrainConfig

        TrainConfig(steps=self.steps, batch=self.batch or 1, lr=self.lr, patience=self.patience).check()
        if self.eval_every is not None and self.eval_every < 1:
            raise QuadcError(f"--eval-every must be at least 1, got {self.eval_every}")
        if self.threads is not None and self.threads < 1:
            raise QuadcError(f"--threads must be at least 1, got {self.threads}")
        if self.loss not in LOSSES:
            raise QuadcError(f"--loss must be one of {', '.join(LOSSES)}, got '{self.loss}'")
        if self.data is not None and self.level != "model":
            raise QuadcError("--data (the diffusion loss) needs --level model")


def _feeds(ws: Any, options: AlignOptions) -> tuple[list[dict[str, np.ndarray]], str, list[dict[str, np.ndarray]], str]:
    from quadc.quant.feeds import npz_feeds, random_feeds

    plan_opts = ws.pass_options.get("quant-plan", {})
    seed = int(plan_opts.get("calib_seed") or 0)
    calib = plan_opts.get("calib_dir")
    if calib:
        train_feeds = npz_feeds(calib, ws.float_graph)
        train_desc = f"{len(train_feeds)} .npz feeds from {calib}"
    else:
        train_feeds = random_feeds(ws.float_graph, options.feeds, seed=seed)
        train_desc = f"{options.feeds} synthetic sampler-schedule feeds (seed {seed})"
    if options.eval_dir:
        eval_feeds = npz_feeds(options.eval_dir, ws.float_graph)
        eval_desc = f"{len(eval_feeds)} .npz feeds from {options.eval_dir}"
    else:
        eval_feeds = random_feeds(ws.float_graph, options.eval_feeds, seed=seed + EVAL_SEED_OFFSET)
        eval_desc = f"{options.eval_feeds} synthetic sampler-schedule feeds (seed {seed + EVAL_SEED_OFFSET})"
    return train_feeds, train_desc, eval_feeds, eval_desc


def _outputs(sess: Any, feeds: Sequence[Mapping[str, np.ndarray]], lora_feeds: Mapping[str, np.ndarray]
             ) -> list[np.ndarray]:
    names = {i.name for i in sess.get_inputs()}
    out = []
    for f in feeds:
        res = sess.run(None, {k: v for k, v in {**f, **lora_feeds}.items() if k in names})
        out.append(np.concatenate([np.asarray(r, np.float64).reshape(-1) for r in res]))
    return out


def _targets(ws: Any, lora: Any, feeds: Sequence[Mapping[str, np.ndarray]], loss: str
             ) -> tuple[list[np.ndarray], list[float]]:
    """Per feed, the student's target and the loss's normalizer. ``output``: the float graph's output with
    the original LoRA, normalized by its energy. ``effect``: the quantized base output plus the float
    effect ``F(L) - F(base)``, normalized by the effect's energy, so the loss is the error of the
    student's own effect ``S(L) - Q(base)`` (``Q(base)`` does not depend on the LoRA)."""
    from quadc.align.workspace import session
    from quadc.lora.pack import pack_task, quantize_task

    teacher = _outputs(session(ws.float_graph), feeds, pack_task(lora, ws.float_slots))
    if loss == "output":
        return [t.astype(np.float32) for t in teacher], [max(float(np.sum(t * t)), 1e-30) for t in teacher]
    base = _outputs(session(ws.float_graph), feeds, pack_task(None, ws.float_slots))
    zeros = pack_task(None, ws.slots)
    qbase = _outputs(session(ws.qdq_graph), feeds, zeros if ws.plan.lora_float_inputs else quantize_task(zeros, ws.plan))
    effects = [t - b for t, b in zip(teacher, base, strict=True)]
    return ([(q + e).astype(np.float32) for q, e in zip(qbase, effects, strict=True)],
            [max(float(np.sum(e * e)), 1e-30) for e in effects])


def _saturated(ws: Any, lora: Any) -> float:
    from quadc.lora.pack import pack_task, saturation

    own = {n for m in lora.layers for n in (ws.slots[m].down_input, ws.slots[m].up_input)}
    return round(saturation({k: v for k, v in pack_task(lora, ws.slots).items() if k in own}, ws.plan).fraction, 8)


def _config(options: AlignOptions, level: str) -> Any:
    from quadc.align.trainer import TrainConfig

    batch = options.batch if options.batch and level == options.level else _BATCH[level]
    return TrainConfig(steps=options.steps, batch=batch, lr=options.lr * _LR_RATIO[level], patience=options.patience,
                       eval_every=options.eval_every, seed=options.seed, show_bar=options.show_bar)


def _better_start(objective: Any, factors: Any, start: Any, original: Any, task: str, level: str,
                  progress: Callable[[str], None]) -> None:
    """Leave ``factors`` at ``start`` (equalized, or the layer level's result) unless the original LoRA has
    the lower validation loss of ``objective``; both are projected onto the shared grids first."""
    from quadc.align.trainer import validation_loss

    if start is original:
        return
    objective.project()
    ours = validation_loss(objective)
    factors.load(original)
    objective.project()
    if validation_loss(objective) <= ours:
        progress(f"task '{task}': the {level} level starts from the original LoRA (it does better on the "
                 "validation samples)")
        return
    factors.load(start)
    objective.project()


def _align_task(ws: Any, task: str, options: AlignOptions, train_feeds: Sequence[Mapping[str, np.ndarray]],
                device: Any, shared: dict[str, Any], progress: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
    """Train one task: the layer level, and for ``model`` (unless ``warm_start`` is off) the model level
    starting from the layer level's factors. Returns the aligned LoRA and the training records by phase."""
    from quadc.align.equalize import equalize
    from quadc.align.objectives import LayerObjective, ModelObjective, capture_rows
    from quadc.align.quantsim import QuantSim
    from quadc.align.trainer import train

    original = ws.loras[task]
    lora = equalize(original, ws.slots, ws.plan) if options.equalize else original
    phases: dict[str, Any] = {}
    if options.level == "layer" or options.warm_start:
        progress(f"task '{task}': capturing its LoRA layers' inputs")
        rows = capture_rows(ws.float_graph, ws.float_slots, lora, train_feeds, options.rows, options.seed)
        layer = LayerObjective(ws.float_graph, ws.float_slots, ws.plan, lora, rows,
                               val_fraction=options.val_fraction, seed=options.seed).to(device)
        _better_start(layer, layer.factors, lora, original, task, "layer", progress)
        phases["layer"] = train(layer, _config(options, "layer"), label=f"align {task} (layer)", progress=progress)
        lora = layer.factors.to_lora(task)
    if options.level == "model":
        from quadc.align.data import task_examples
        from quadc.align.interpreter import OnnxModule

        progress(f"task '{task}': teacher outputs on {len(train_feeds)} feeds")
        targets, norms = _targets(ws, original, train_feeds, options.loss)
        if "net" not in shared:
            names = {n for s in ws.slots.values() for n in (s.down_input, s.up_input)}
            shared["net"] = OnnxModule(ws.qdq_graph, float_dq_inputs=names)
        sim = QuantSim(ws.qdq_graph, ws.slots, lora, net=shared["net"])
        data = task_examples(options.data, task, ws.qdq_graph, options.seed) if options.data else None
        if data is not None:
            progress(f"task '{task}': {len(data)} task examples for the diffusion loss")
        model = ModelObjective(sim, ws.plan, train_feeds, targets, norms, data=data, data_weight=options.data_weight,
                               val_fraction=options.val_fraction, seed=options.seed).to(device)
        assert sim.factors is not None
        sim.factors.load(lora)
        _better_start(model, sim.factors, lora, original, task, "model", progress)
        phases["model"] = train(model, _config(options, "model"), label=f"align {task} (model)", progress=progress)
        lora = sim.to_lora(task)
    return lora, phases


def align(model: str | os.PathLike[str] | None, loras: Mapping[str, str | os.PathLike[str]],
          out_dir: str | os.PathLike[str], options: AlignOptions | None = None, *, target: str = "onnx-qdq",
          passes: str | Sequence[str] | None = None, pass_options: Mapping[str, Mapping[str, Any]] | None = None,
          force: bool = False, progress: Callable[[str], None] = silent_progress) -> dict[str, Any]:
    """Align every non-anchor LoRA and write ``out_dir`` (see the module docstring); returns the report.

    Under ``torchrun``/``accelerate launch`` every rank trains its share and only rank 0 writes."""
    import torch

    from quadc.align.evaluate import Evaluator
    from quadc.align.files import write_lora
    from quadc.align.trainer import dist_info, finish_distributed, init_distributed
    from quadc.align.workspace import build_workspace
    from quadc.artifact import check_output_dir, staged_directory, write_json
    from quadc.quant.encodings import write_encodings
    from quadc.quant.plan_file import encodings_file_of

    options = options or AlignOptions()
    options.check()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    device = init_distributed(options.device)
    rank, world = dist_info()
    if rank == 0:
        check_output_dir(out_dir, force=force, inputs=[model, *loras.values()])
    else:
        progress = silent_progress
        options = replace(options, show_bar=False)
    ws = build_workspace(model, loras, target=target, passes=passes, pass_options=pass_options,
                         plan_defaults={"activation_profile": ALIGN_PROFILE}, progress=progress)
    train_feeds, train_desc, eval_feeds, eval_desc = _feeds(ws, options)
    anchor = ws.anchor
    progress(f"shared encodings: policy {ws.plan.lora_policy}" + (f", anchor '{anchor}' (kept as it is)" if anchor else
                                                                  ", no anchor (every task is aligned)"))
    aligned: dict[str, Any] = {}
    results: dict[str, Any] = {}
    shared: dict[str, Any] = {}
    for task, lora in ws.loras.items():
        if task == anchor:
            aligned[task] = lora
            continue
        aligned[task], results[task] = _align_task(ws, task, options, train_feeds, device, shared, progress)
    finish_distributed()
    if rank != 0:
        return {}
    kept = _keep_better(ws, aligned, results, train_feeds, options, progress)
    progress(f"measuring every task before and after on {eval_desc}")
    evaluator = Evaluator(ws, eval_feeds)
    report: dict[str, Any] = {
        "model": ws.model_path.name, "level": options.level, "target": target,
        "lora_policy": ws.plan.lora_policy, "anchor": anchor, "activation_profile": ws.plan.activation_profile,
        "world_size": world, "device": str(device),
        "train_feeds": train_desc, "eval_feeds": eval_desc,
        "options": {k: v for k, v in asdict(options).items() if k not in ("show_bar",)},
        "metric": "effect = out(task) - out(base); SQNR of the quantized shared-encoding graph against the float "
                  "graph with the original LoRA, summed over the evaluation feeds; float_sqnr_db: the candidate's "
                  "float output against the original's",
        "tasks": {},
    }
    for task, lora in ws.loras.items():
        before = evaluator.scores(lora)
        after = evaluator.scores(lora, aligned[task])
        entry: dict[str, Any] = {
            "role": "anchor" if task == anchor else "aligned", "file": f"{task}.safetensors",
            "source": Path(str(lora.source)).name, "before": before, "after": after,
            "effect_gain_db": _gain(before["effect_sqnr_db"], after["effect_sqnr_db"]),
            "saturated": {"before": _saturated(ws, lora), "after": _saturated(ws, aligned[task])},
        }
        if task in results:
            entry["training"] = {phase: r.to_dict() for phase, r in results[task].items()}
            entry["kept"] = kept[task]
        report["tasks"][task] = entry
        progress(f"task '{task}': effect SQNR {_db(before['effect_sqnr_db'])} -> {_db(after['effect_sqnr_db'])}, "
                 f"output SQNR {_db(before['output_sqnr_db'])} -> {_db(after['output_sqnr_db'])}, float "
                 f"{_db(after['float_sqnr_db'])}")
    with staged_directory(out_dir, force=force) as tmp:
        for task, lora in aligned.items():
            write_lora(lora, tmp / f"{task}.safetensors")
        write_encodings(tmp / "encodings.json", encodings_file_of(ws.plan))
        write_json(tmp / "report.json", report)
    return report


def _keep_better(ws: Any, aligned: dict[str, Any], results: Mapping[str, Any],
                 train_feeds: Sequence[Mapping[str, np.ndarray]], options: AlignOptions,
                 progress: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """The last check of every trained task, on onnxruntime (the artifact's graph, not the simulation): on
    the validation share of the training feeds (the model level's held-out feeds; never the evaluation
    feeds), keep the aligned LoRA only where its effect SQNR beats the original's, else put the original
    back in ``aligned``. Neither objective is the effect SQNR of the whole quantized network (the layer
    level sees one branch at a time, the model level a few feeds), so this keeps alignment from ever
    shipping a LoRA that its own data says got worse. Returns per task the two validation scores and
    which one was kept."""
    from quadc.align.evaluate import Evaluator
    from quadc.align.objectives import split_ids

    if not results:
        return {}
    _, val = split_ids(len(train_feeds), options.val_fraction, options.seed)
    evaluator = Evaluator(ws, [train_feeds[i] for i in val])
    out: dict[str, dict[str, Any]] = {}
    for task in results:
        original = ws.loras[task]
        before, after = evaluator.scores(original), evaluator.scores(original, aligned[task])
        better = _higher(after["effect_sqnr_db"], before["effect_sqnr_db"])
        if not better:
            aligned[task] = original
        out[task] = {"which": "aligned" if better else "original", "validation_feeds": len(val),
                     "validation_effect_sqnr_db": {"original": before["effect_sqnr_db"],
                                                   "aligned": after["effect_sqnr_db"]}}
        progress(f"task '{task}': validation effect SQNR {_db(before['effect_sqnr_db'])} original, "
                 f"{_db(after['effect_sqnr_db'])} aligned: keeping the {out[task]['which']} LoRA")
    return out


def _higher(a: float | None, b: float | None) -> bool:
    """Whether SQNR ``a`` is above ``b`` (None: exact, infinite)."""
    return (a is None and b is not None) or (a is not None and b is not None and a > b)


def _gain(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else round(after - before, 4)


def _db(value: float | None) -> str:
    return "exact" if value is None else f"{value:.2f} dB"


def compile_aligned(model: str | os.PathLike[str] | None, out_dir: str | os.PathLike[str], compile_options: Any,
                    align_options: AlignOptions, progress: Callable[[str], None] = silent_progress) -> dict[str, Any]:
    """``quadc compile --align``: align into ``<out_dir>.align``, then compile the aligned LoRAs against its
    ``encodings.json`` into ``out_dir`` (see the module docstring); returns the manifest (``{}`` on ranks
    other than 0)."""
    from quadc.artifact import check_output_dir
    from quadc.compiler import compile_model

    out = Path(out_dir)
    align_dir = out.with_name(out.name + ".align")
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        inputs = [model, *compile_options.loras.values()]
        check_output_dir(out, force=compile_options.force, inputs=inputs)
        check_output_dir(align_dir, force=compile_options.force, inputs=inputs)
    report = align(model, compile_options.loras, align_dir, align_options, target=compile_options.target,
                   passes=compile_options.passes, pass_options=compile_options.pass_options,
                   force=compile_options.force, progress=progress)
    if rank != 0:
        return {}
    pass_options = {k: dict(v) for k, v in compile_options.pass_options.items()}
    pass_options.setdefault("quant-plan", {})["encodings_file"] = str(align_dir / "encodings.json")
    loras = {task: str(align_dir / entry["file"]) for task, entry in report["tasks"].items()}
    options = replace(compile_options, loras=loras, pass_options=pass_options)
    return compile_model(model, out, options, progress=progress)
