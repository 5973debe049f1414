"""Code the benchmark scripts share: no experiment of its own, nothing written to ``results/``.

* ``handwritten_dia``: the hand-written DIA-ResNet fxattn's lean model is measured against;
* ``resnet20``: the CIFAR-style ResNet-20 of ``accuracy.py``;
* ``evidence_tasks``: the two tasks (cluttered digits, MNIST-1D) and their residual CNNs of
  ``evidence.py`` and ``lowp_blocks.py``;
* ``results_io``: how a script records a run (its command line, ``<stem>.json`` and ``.md``).

The scripts import it as ``benchmarks.common.<module>`` after putting the repository root on
``sys.path``, so each still runs as ``python benchmarks/<script>.py`` from the root.
"""
