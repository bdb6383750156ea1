"""Training and evaluation machinery.

``trainer`` (the loop), ``optim`` (SGD, lr scaling and schedule, clipping), ``checkpoint`` (atomic,
weights_only files), ``dist`` (torchrun process groups), ``inference`` (the evaluation loop),
``evaluator`` (COCO metrics) and ``logging`` (log.jsonl). Import from the submodules; this package
imports nothing so that ``import pisa.engine.dist`` stays light.
"""
