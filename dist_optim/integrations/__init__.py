"""Integrations with training frameworks: DeepSpeed (``dist_optim.deepspeed``) and torch's
ZeroRedundancyOptimizer, each hooked in when that framework is first imported."""
