"""Evaluation: embeddings, LFW-protocol verification, identification (CMC, linear probe, subsets), reports."""
from .embeddings import embed_dataset, extract_embeddings
from .identification import RANKS, cmc, linear_probe, subset_report
from .report import (identification_rows, markdown_table, plot_roc, save_png, verification_rows,
                     write_identification_report, write_json, write_verification_report)
from .verification import (THRESHOLDS, VerificationResult, kfold_contiguous, pair_distances, roc_curve, verify,
                           verify_embeddings)

__all__ = ["embed_dataset", "extract_embeddings", "RANKS", "cmc", "linear_probe", "subset_report", "markdown_table", "plot_roc", "save_png",
           "verification_rows", "write_json", "write_verification_report", "identification_rows",
           "write_identification_report", "THRESHOLDS", "VerificationResult",
           "kfold_contiguous", "pair_distances", "roc_curve", "verify", "verify_embeddings"]
