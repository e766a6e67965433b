"""Super-resolving your own images from a checkpoint: loading (``loading``), tiling (``tiling``), files
(``files``), calibration (``calibration``, ``calibrate``), the ``superresolve`` command and ``evaluate``.
Imports ``training`` and the floors below it."""
