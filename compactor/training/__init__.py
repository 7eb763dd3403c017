"""Training machinery for passes that train a model (``distill``).

``losses``: distillation losses (KL on soft targets, CE on labels, MSE, MSE over the
teacher's variance, cosine, feature hints), per model output. ``loop``: the training loop
(AdamW, warmup + cosine, evaluation, best checkpoint, early stopping, graceful Ctrl-C).
``checkpoint``: training checkpoints and the run folder that lets ``compactor optimize
--resume`` continue an interrupted run. ``ddp``: data-parallel training when launched
under ``torchrun``.

Importing this package stays light: torch is imported by the modules that need it, inside
their functions.
"""
