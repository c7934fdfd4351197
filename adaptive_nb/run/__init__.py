"""The run layer: the training loop, its control mailbox, observers, input checks and the
report. ``adaptive_nb.train`` / ``adaptive_nb.start`` live in :mod:`adaptive_nb.run.api`.

This package's ``__init__`` imports nothing, so that :mod:`adaptive_nb.run.plugins`
(torch-free) can be filled by the package facade without importing torch.
"""
