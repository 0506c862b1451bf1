"""Integrations with training frameworks: DeepSpeed (``dist_optim.deepspeed``)."""
