"""The embedded experiments, run end to end by the project's own scripts: `python -m experiments.digits` (the digits
pipeline and its tables and figures: report), the stage runner they share, and the history probes."""
