"""Claims measured: one quantized graph whose LoRA inputs share ONE encoding per slot (QSS anchor or unified
fallback) keeps every task's output close to what quantizing that task on its own gives, and close to
onnxruntime's own quantizer on the merged graph; more 8-bit activations cost quality as in the paper's
W8A8:W8A16 ablation; and quadc quantizes the full U-Net in time and memory comparable to onnxruntime.

Run: ``.venv/bin/python benchmarks/bench_quant.py`` (quality on the tiny U-Net with the bundled tasks,
then speed on the full SD1.5 U-Net); ``--part quality`` or ``--part speed`` for one half.

Quality, per task, SQNR and PSNR of the U-Net output against the float graph with that task bound, on
held-out inputs (seed 123; calibration uses seed 0):
  (a) own      each task quantized on its own (one graph per task: the incompatible upper bound)
  (b) anchor   one graph, shared encodings from the QSS anchor
  (c) unified  one graph, shared encodings from the merged distribution of all LoRAs
  (d) ort      onnxruntime's ``quantize`` with ``get_qnn_qdq_config`` (u16 activations, u8 weights) on the
               merged float graph of that task after ORT's ``quant_pre_process``, same calibration feeds
Ablation: the paper's W8A8:W8A16 table, SQNR/PSNR as ``--a8-fraction`` goes 0 -> 1 (least sensitive first).
Speed: quadc's W8A16 quantization (calibration + plan + qdq-insert + save) of the full U-Net vs
onnxruntime's ``quantize`` with the same calibration feeds, on the opset-21 dynamo export (ORT's
16-bit path needs opset 21 and its version converter fails above 2 GB), each in a fresh process with
its own peak RSS.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from _common import CACHE, cached_export, measure

CALIB = 4


def psnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    mse = float(np.mean((ref.astype(np.float64) - test) ** 2))
    peak = float(np.max(ref) - np.min(ref))
    return float("inf") if mse == 0 else 10 * np.log10(peak * peak / mse)


class _Reader:
    """onnxruntime CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - API completeness
        pass


def ort_quantize(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], *, pre_process: bool = False) -> Path:
    """onnxruntime's quantize with its QNN config (u16 activations, u8 weights).

    ``pre_process`` first runs ORT's recommended ``quant_pre_process`` (shape inference + graph
    optimization): on a raw TorchScript export ORT otherwise puts Q/DQ on unfolded constant chains and
    the output falls to ~3 dB SQNR, which would be an unfair baseline.
    """
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    if pre_process:
        prepped = dst.with_name(dst.stem + ".pre.onnx")
        quant_pre_process(str(src), str(prepped))
        src = prepped

    cfg = get_qnn_qdq_config(str(src), _Reader(feeds), activation_type=QuantType.QUInt16,
                             weight_type=QuantType.QUInt8)
    cfg.use_external_data_format = (src.parent / (src.name + ".data")).exists()
    quantize(str(src), str(dst), cfg)
    return dst


def quality(args: argparse.Namespace) -> None:
    import onnxruntime as ort

    from quadc import frontend
    from quadc.compiler import CompileOptions, bundled_loras, bundled_model, compile_model
    from quadc.graph import load_model, save_model
    from quadc.lora import fit_lora, read_lora
    from quadc.lora.merge import merge_lora
    from quadc.quant.affine import sqnr_db
    from quadc.quant.feeds import random_feeds
    from quadc.runtime.engine import Engine

    model = bundled_model()
    loras = {k: str(v) for k, v in bundled_loras().items()}
    graph, info = frontend.load(model)
    calib = random_feeds(graph, CALIB, seed=0)
    evals = random_feeds(graph, args.eval, seed=123)
    work = Path(tempfile.mkdtemp(prefix="quadc-bench-quant-"))
    try:
        def build(name: str, task_loras: dict[str, str], **extra) -> Engine:
            compile_model(model, work / name, CompileOptions(target="onnx-qdq", loras=task_loras,
                                                             pass_options={"quant-plan": {"calib_random": CALIB, **extra}}))
            return Engine(work / name)

        compile_model(model, work / "float", CompileOptions(target="onnx", loras=loras))
        ref = Engine(work / "float")
        shared = {"anchor": build("anchor", loras, lora_policy="anchor"),
                  "unified": build("unified", loras, lora_policy="unified")}
        anchor_name = __import__("json").loads((work / "anchor" / "manifest.json").read_text())["quant"]["anchor"]
        rows = []
        for task, path in loras.items():
            own = build(f"own-{task}", {task: path})
            g = load_model(model)
            merge_lora(g, info, fit_lora(read_lora(path, name=task, info=info), info))
            merged = save_model(g, work / f"merged-{task}" / "unet.onnx")
            # The merged float graph of a task is exactly what it is quantized from, so also its reference.
            ort_q = ort_quantize(merged, work / f"ort-{task}.onnx", list(calib), pre_process=True)
            sess = ort.InferenceSession(str(ort_q), providers=["CPUExecutionProvider"])
            scores: dict[str, list[tuple[float, float]]] = {k: [] for k in ("own", "anchor", "unified", "ort")}
            for feed in evals:
                want = ref.run(feed, task=task)["out_sample"]
                outs = {"own": own.run(feed, task=task)["out_sample"],
                        "anchor": shared["anchor"].run(feed, task=task)["out_sample"],
                        "unified": shared["unified"].run(feed, task=task)["out_sample"],
                        "ort": sess.run(None, feed)[0]}
                for k, got in outs.items():
                    scores[k].append((sqnr_db(want, got), psnr_db(want, got)))
            rows.append((task, {k: np.mean(v, axis=0) for k, v in scores.items()}))
        print(f"quality on the tiny U-Net, {len(evals)} held-out inputs, calibration {CALIB} inputs; "
              f"anchor = {anchor_name}")
        head = "".join(f"{k + ' SQNR/PSNR dB':>24}" for k in ("(a) own", "(b) anchor", "(c) unified", "(d) ort"))
        print(f"{'task':<18}{head}")
        for task, s in rows:
            cells = "".join(f"{s[k][0]:>12.1f} / {s[k][1]:>7.1f}  " for k in ("own", "anchor", "unified", "ort"))
            print(f"{task:<18}{cells}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ablation(args: argparse.Namespace) -> None:
    """The paper's W8A8:W8A16 ablation: SQNR/PSNR per task as the 8-bit fraction of activations grows."""
    from quadc.compiler import CompileOptions, bundled_loras, bundled_model, compile_model
    from quadc.graph import load_model
    from quadc.quant.affine import sqnr_db
    from quadc.quant.feeds import random_feeds
    from quadc.runtime.engine import Engine

    model = bundled_model()
    loras = {k: str(v) for k, v in bundled_loras().items()}
    evals = random_feeds(load_model(model), args.eval, seed=123)
    work = Path(tempfile.mkdtemp(prefix="quadc-bench-a8-"))
    try:
        compile_model(model, work / "float", CompileOptions(target="onnx", loras=loras))
        ref = Engine(work / "float")
        print(f"W8A8:W8A16 ablation on the tiny U-Net (shared encodings, mean over tasks, {len(evals)} inputs)")
        print(f"{'W8A8:W8A16':>11} {'SQNR dB':>9} {'PSNR dB':>9}")
        for fraction in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
            name = f"a8-{fraction}"
            compile_model(model, work / name, CompileOptions(target="onnx-qdq", loras=loras,
                                                             pass_options={"quant-plan": {"calib_random": CALIB, "a8_fraction": fraction}}))
            eng = Engine(work / name)
            scores = [(sqnr_db(w, g), psnr_db(w, g)) for feed in evals for task in loras
                      for w, g in [(ref.run(feed, task=task)["out_sample"], eng.run(feed, task=task)["out_sample"])]]
            s, p = np.mean(scores, axis=0)
            print(f"{round(fraction * 100):>5}:{round(100 - fraction * 100):<5} {s:>9.1f} {p:>9.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def speed(args: argparse.Namespace) -> None:
    src = cached_export("sd15", "dynamo", opset=21)
    out = CACHE / "quant-speed"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    feeds_code = (
        "from quadc.graph import load_model\nfrom quadc.quant.feeds import random_feeds\n"
        f"feeds = random_feeds(load_model({str(src)!r}), {args.speed_calib}, seed=0)\n"
    )
    print(f"full sd15 (dynamo, opset 21), {args.speed_calib} calibration inputs, W8A16", flush=True)
    ours = measure(
        feeds_code.replace("feeds = ", "_ = ") +
        "from quadc.compiler import CompileOptions, compile_model\n"
        f"compile_model({str(src)!r}, {str(out / 'quadc')!r}, CompileOptions(target='onnx-qdq', "
        f"pass_options={{'quant-plan': {{'calib_random': {args.speed_calib}}}}}))"
    )
    print(f"quadc compile --target onnx-qdq : {ours['seconds']:8.1f} s  peak RSS {ours['peak_rss_gib']:.2f} GiB",
          flush=True)
    theirs = measure(
        "import sys\nsys.path.insert(0, 'benchmarks')\n" + feeds_code +
        "from bench_quant import ort_quantize\nfrom pathlib import Path\n"
        f"ort_quantize(Path({str(src)!r}), Path({str(out / 'ort.onnx')!r}), feeds)",
        allow_failure=True,
    )
    if "failed" in theirs:
        print(f"onnxruntime quantize (QNN cfg)  : FAILED ({theirs['failed']}) after {theirs['seconds']:.1f} s, "
              f"peak RSS {theirs['peak_rss_gib']:.2f} GiB of this machine's 24 GiB")
    else:
        print(f"onnxruntime quantize (QNN cfg)  : {theirs['seconds']:8.1f} s  peak RSS {theirs['peak_rss_gib']:.2f} GiB")
        print(f"ratio quadc/ort: time {ours['seconds'] / theirs['seconds']:.2f}, "
              f"peak RSS {ours['peak_rss_gib'] / theirs['peak_rss_gib']:.2f}")
    shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["quality", "ablation", "speed", "all"], default="all")
    parser.add_argument("--eval", type=int, default=4, help="held-out inputs for the quality table")
    parser.add_argument("--speed-calib", type=int, default=2, help="calibration inputs for the speed part")
    args = parser.parse_args()
    if args.part in ("quality", "all"):
        quality(args)
    if args.part in ("ablation", "all"):
        ablation(args)
    if args.part in ("speed", "all"):
        speed(args)


if __name__ == "__main__":
    main()
