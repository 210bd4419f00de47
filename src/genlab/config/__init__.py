"""A run's configuration: where the YAML files live and how they compose (`compose`),
Hydra's errors in genlab's words (`hydra_errors`), and the start-up check that refuses a
config genlab cannot run (`validate`)."""

from genlab.config import resolvers  # noqa: F401  (registers ${genlab.eval_dir:...})
from genlab.config.compose import CONF_DIR, compose_config

__all__ = ["CONF_DIR", "compose_config"]
