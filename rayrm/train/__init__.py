"""Training: window sampling (``windows``), the model (``model``), checkpoints
(``checkpoint``), the per-worker loop (``loop``) and the driver (``trainer``)."""
