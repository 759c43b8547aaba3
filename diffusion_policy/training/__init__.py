"""Training: the trainer, its parts, checkpoints and logging.

Importing the package registers the structured configs (``trainer/schema``) that
``configs/trainer/default.yaml`` composes over; import it before composing a config.
"""

from diffusion_policy.training.config_checks import register_configs

register_configs()
