"""Reports of a finished run: PNG figures (matplotlib) and one self-contained report.html."""

from rayattr.report.html import write_report

__all__ = ["write_report"]
