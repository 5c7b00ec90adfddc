"""river-bench, one job per module: ``methods`` (what is compared), ``run`` (running them
interleaved and timed), ``report`` (figures, markdown, JSON, plots), ``eval_data`` (prompts,
reference text, math problems, HumanEval), ``sandbox`` (running model-written code), ``cli``.
"""
