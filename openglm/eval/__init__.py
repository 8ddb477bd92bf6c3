"""Evaluation of openglm models (`openglm eval`).

tasks.py reads task configs and data formats into prompts, scorer.py scores them with a model
(lm.py: bits per byte), metrics.py turns scores into metrics with bootstrap errors, runner.py runs
tasks and reports, heldout.py builds the bundled held-out sets.
"""
