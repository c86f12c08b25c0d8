"""On-disk formats: atomic checkpoint directories."""
from .checkpoint import REPORT_FILE, atomic_output_dir, read_report, save

__all__ = ["REPORT_FILE", "atomic_output_dir", "read_report", "save"]
