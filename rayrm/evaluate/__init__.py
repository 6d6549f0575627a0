"""Evaluation: whole-episode curves (``curves``), metrics/plots (``report``), the driver
(``run``)."""
