"""The training job behind ``dist-optim train``: a small GPT-style byte-level language model trained
under one of the supported strategies with any of our optimizers."""
