"""QiD (quantization-induced degradation) scaling laws: measure, fit, predict, plot."""

from quantkit.qid.estimate import training_level
from quantkit.qid.fit import compare_methods, fit_single, fit_table, fit_unified, format_fits
from quantkit.qid.laws import PUBLISHED_LAWS, PYTHIA_TOKENS_PER_STEP, UnifiedLaw, load_law
from quantkit.qid.table import COLUMNS, QidTable, TableWriter, parse_table, read_table

__all__ = [
    "COLUMNS",
    "PUBLISHED_LAWS",
    "PYTHIA_TOKENS_PER_STEP",
    "QidTable",
    "TableWriter",
    "UnifiedLaw",
    "compare_methods",
    "fit_single",
    "fit_table",
    "fit_unified",
    "format_fits",
    "load_law",
    "parse_table",
    "read_table",
    "training_level",
]
