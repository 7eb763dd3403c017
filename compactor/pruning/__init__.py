"""Structural pruning: channels, neurons and attention heads removed for real, so the
exported model has fewer parameters and runs faster.

- ``graph``: the only module that uses Torch-Pruning (its dependency graph says which
  layers share each channel, and it does the layer surgery);
- ``pruner``: how many channels and heads each layer keeps and which, targets;
- ``attention``: where attention heads are, and keeping blocks consistent without some;
- ``count``: parameters and MACs of a torch model;
- ``sensitivity``: how the metric moves as each layer is pruned alone.

Everything here imports torch; the ``prune`` pass imports it inside ``run``.
"""
