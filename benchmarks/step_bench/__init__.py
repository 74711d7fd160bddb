"""The parts of benchmarks/train_step.py, one job each:

- plan.py            what to run: the setting, RunConfig, the ABBA run order, which runs pair up
- steps.py           building a configuration and timing its steps (the worker, the interleaved pair)
- measure.py         how to measure: peak memory, the matmul peak, the environment
- flops.py           the analytic FLOP count of a step, and torch's own count to check it
- reference_cost.py  the reference-cost model (getao/icae's way of spending compute; not a training path)
- report.py          summary, ratios ours / reference-cost, and the markdown tables
"""
