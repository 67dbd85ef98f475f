"""What a run did: `PruneReport` and its records (`records`), and report.html with its figures (`html`)."""

from .records import AttentionRecord, ExpertRecord, LayerRecord, PruneReport, ReconstructionRecord

__all__ = ["AttentionRecord", "ExpertRecord", "LayerRecord", "PruneReport", "ReconstructionRecord"]
