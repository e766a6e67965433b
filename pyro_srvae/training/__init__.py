"""Training: the configuration (``config``), what a run is built from (``factory``), the objective and
step (``objective``), the update guard (``guard``), the loop (``loop``), checkpoints, distributed
training, TensorBoard and the report. Imports the floors below it: ``metrics``, ``plots``, ``data``,
``model``, ``utils``."""
