"""genlab's Hydra plugins. They live in the ``hydra_plugins`` namespace package, where
Hydra looks for plugins; genlab's configs name them by ``_target_``."""
