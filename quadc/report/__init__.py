"""``quadc report``: quality (quantized vs float pipeline) and cost (ROM, RAM, latency) of an artifact as
one self-contained HTML page (:func:`build_report`, :func:`write_report`)."""

from quadc.report.build import ReportData, TaskResult, build_report
from quadc.report.html import write_report

__all__ = ["ReportData", "TaskResult", "build_report", "write_report"]
