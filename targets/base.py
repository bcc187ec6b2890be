"""Target plugins: the base class and discovery through the ``quadc.targets`` entry-point group.

A target names the ordered passes it needs, the encoding scheme its quantized graph uses (``scheme``,
:mod:`quadc.quant.schemes`), its own declared ``options`` (like a pass's), writes its artifact files with
``emit`` and checks them with ``verify``. ``available()`` says whether the executor or compiler it needs
is installed (``quadc compile --target all`` builds every available target). Built-in targets register through the same entry-point group outside packages use::

    [project.entry-points."quadc.targets"]
    mynpu = "mynpu_quadc:MyNpuTarget"

so adding a vendor never means editing quadc.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import onnx_graphsurgeon as gs

from quadc.errors import QuadcError
from quadc.options import PassOption, parse_options

if TYPE_CHECKING:
    from quadc.context import CompileContext
    from quadc.passes import PassPipeline

ENTRY_POINT_GROUP = "quadc.targets"


class Target:
    """Base class of every target backend."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: The target's pipeline as pass and preset names (presets: :mod:`quadc.passes.presets`).
    passes: ClassVar[tuple[str, ...]] = ()
    #: Passes the artifact cannot do without: a pipeline that lacks one is refused before any work.
    #: ``lora-inputs`` is needed only when LoRAs are compiled.
    requires_passes: ClassVar[tuple[str, ...]] = ("lora-inputs",)
    #: Passes whose result the artifact cannot hold (e.g. Q/DQ in a float artifact).
    forbids_passes: ClassVar[tuple[str, ...]] = ()
    #: The encoding scheme the ``quant-plan`` stage derives this target's encodings in (None: qnn-htp).
    scheme: ClassVar[str | None] = None
    #: The target's own options (``--set TARGET.OPTION=VALUE``), parsed into ``self.opts``.
    options: ClassVar[tuple[PassOption, ...]] = ()
    #: Whether the artifact is compiled for one input shape (NPU graphs): a model with symbolic input
    #: dimensions is then refused by :meth:`check_model` before any pass runs.
    static_shapes: ClassVar[bool] = False

    def __init__(self, **values: Any) -> None:
        self.opts: dict[str, Any] = parse_options(self.options, values, self.name)

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """``(True, "")`` when what the target needs is installed, else ``(False, why)``."""
        return True, ""

    def pipeline(self) -> PassPipeline:
        """The target's default pipeline, editable by name (``insert_pass``, ``remove_passes``, ...)."""
        from quadc.passes import PassPipeline

        return PassPipeline(list(self.passes))

    def check_pipeline(self, names: Sequence[str], with_loras: bool) -> None:
        """Refuse, in one line naming the pass, a pipeline that cannot give this target's artifact
        (``with_loras``: whether LoRAs are compiled, which makes ``lora-inputs`` necessary)."""
        needed = [p for p in self.requires_passes if p != "lora-inputs" or with_loras]
        missing = [p for p in needed if p not in names]
        if missing:
            why = " (LoRAs are given)" if missing[0] == "lora-inputs" else ""
            raise QuadcError(f"target '{self.name}' needs pass '{missing[0]}'{why}, which the pipeline "
                             f"({','.join(names)}) lacks; add it or use the target's default pipeline")
        wrong = [p for p in self.forbids_passes if p in names]
        if wrong:
            raise QuadcError(f"target '{self.name}' cannot hold the result of pass '{wrong[0]}'; remove it "
                             "from --passes or choose a target that takes it (see `quadc targets`)")

    def check_model(self, graph: gs.Graph) -> None:
        """Refuse, in one line, a loaded model this target cannot compile, before any pass runs (the base
        target: a model with symbolic input dimensions when :attr:`static_shapes`)."""
        if not self.static_shapes:
            return
        from quadc.graph_inputs import dynamic_inputs

        problems = dynamic_inputs(graph)
        if problems:
            more = f" ({len(problems) - 1} more)" if len(problems) > 1 else ""
            raise QuadcError(f"target '{self.name}' compiles for one input shape, but {problems[0]}{more}; export "
                             "the model with static shapes (quadc export, or fix the dimensions with onnxruntime's "
                             "make_dynamic_shape_fixed tool)")

    def check_plan_options(self, plan_options: Mapping[str, Any]) -> None:
        """Refuse, in one line, ``quant-plan`` options the target cannot honour (``plan_options``: the
        pipeline's ``quant-plan`` step options as given). The base target takes any."""

    @staticmethod
    def write_graph(graph: gs.Graph, out_dir: Path, name: str = "model.onnx") -> dict[str, Any]:
        """Save ``graph`` as ``out_dir/name`` (+ ``.data``); manifest entries for it and its shared ROM."""
        from quadc.graph import save_model

        path = save_model(graph, out_dir / name)
        files = [path.name] + ([path.name + ".data"] if (out_dir / (path.name + ".data")).exists() else [])
        return {"graph": name, "graph_files": files,
                "shared_rom_bytes": sum((out_dir / f).stat().st_size for f in files)}

    def emit(self, graph: gs.Graph, ctx: CompileContext, out_dir: Path) -> dict[str, Any]:
        """Write the target's files into ``out_dir``; return manifest entries to merge."""
        raise NotImplementedError

    def verify(self, artifact_dir: Path, feeds: dict[str, Any], task: str | None = None) -> dict[str, Any]:
        """Run the artifact and report its error against the float graph."""
        raise NotImplementedError


def discover_targets() -> dict[str, type[Target]]:
    """All targets registered under the ``quadc.targets`` entry-point group, by name."""
    found: dict[str, type[Target]] = {}
    from quadc.plugins import plugins

    for ep, cls in plugins(ENTRY_POINT_GROUP, "target", Target):
        found[cls.name or ep.name] = cls
    return dict(sorted(found.items()))


def get_target(name: str, options: dict[str, Any] | None = None) -> Target:
    """An instance of the target called ``name`` with its ``options`` parsed and checked."""
    targets = discover_targets()
    if name not in targets:
        known = ", ".join(targets) or "none installed"
        raise QuadcError(f"unknown target '{name}'; known targets: {known}")
    return targets[name](**dict(options or {}))
