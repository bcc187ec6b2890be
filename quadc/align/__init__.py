"""quadc.align: QUAD's third step, distilling every non-anchor LoRA under the shared encodings (extra ``align``).

=================  ======================================================================================
module             what it does
=================  ======================================================================================
``fakequant``      torch fake quantization bit-exact with onnxruntime's Q/DQ, clipped straight-through
``ops``            torch versions of the ONNX operators a U-Net graph uses
``interpreter``    ``OnnxModule``: a compiled graph (float or QDQ) as a differentiable torch module
``quantsim``       ``QuantSim``: the QDQ artifact with one task's LoRA factors as the only parameters
``workspace``      the float (teacher) and QDQ (student) graphs and the plan, from the target's pipeline
``equalize``       rank components rescaled between ``down`` and ``up`` to fit the shared grids
``objectives``     ``layer`` (per-slot branch reconstruction) and ``model`` (whole-network distillation)
``data``           task examples for the model level's diffusion loss (``--data``)
``trainer``        Adam with grid-relative steps, projection, early stopping, DDP under torchrun/accelerate
``evaluate``       effect / output / float SQNR of a task on onnxruntime
``files``          aligned LoRAs as diffusers safetensors
``api``            ``align()`` (``quadc align``) and ``compile_aligned()`` (``quadc compile --align``)
=================  ======================================================================================

Importing this package imports nothing heavy; the modules need torch.
"""
