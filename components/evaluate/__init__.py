"""Per-language evaluation: lm-eval suites that run offline, results, plots, routing analysis.

One module per job: :mod:`.catalog` (the registry of suites, light to import), :mod:`.synthetic`
(the world's suite as lm-eval tasks), :mod:`.suites` (real-language benchmarks, FLORES-200,
perplexity), :mod:`.runner` (one model through lm-eval), :mod:`.results` (rows, JSON, averages,
the comparison table), :mod:`.plots`, :mod:`.routing`. Import what you use from its module:
this package loads nothing, so the run config can read the catalog without lm-eval or torch.
"""
