"""Training: optimiser, train state, losses, the sharded train step, checkpoints, hierarchical
native training, and the trainer that ties them together."""
