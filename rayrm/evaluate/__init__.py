"""Evaluation, one module a step: the episodes to score (``inputs``, also read by
``rayrm score``), their curves (``scoring``, through ``curves``), metrics and their text
(``report``), the files (``outputs``: figures and videos through ``figures`` and ``media``,
the HTML page through ``html``), the driver stringing them together (``run``); and the
streaming scorer for online use (``scorer``)."""
