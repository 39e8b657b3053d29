"""The embedded experiments, run end to end by the project's own scripts: `python -m
experiments.digits` and `python -m experiments.fashion` (the stages they share: pipeline; their
tables and figures: report), the stage runner, the history probes and the paired degradation ratio.
"""
