"""Per-language evaluation: lm-eval suites that run offline, results, plots, routing analysis.

One module per job: :mod:`.synthetic` (the world's suite as lm-eval tasks), :mod:`.suites`
(real-language benchmarks, FLORES-200, perplexity), :mod:`.runner` (one model through lm-eval),
:mod:`.results` (rows, JSON, averages, the comparison table), :mod:`.plots`, :mod:`.routing`.
"""

from components.evaluate.results import ResultRow, comparison_table, read_results, write_results
from components.evaluate.runner import EvalOptions, evaluate_loaded, evaluate_model, load_for_eval

__all__ = ["EvalOptions", "ResultRow", "comparison_table", "evaluate_loaded", "evaluate_model",
           "load_for_eval", "read_results", "write_results"]
