"""Evaluation: whole-episode curves (``curves``), metrics (``report``), figures and videos
(``figures``, ``media``), the HTML report (``html``), the driver (``run``), and the streaming
scorer for online use (``scorer``)."""
