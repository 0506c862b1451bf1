"""Distributed layer: finding a rank's shard, process groups and the collectives the optimizers need."""
