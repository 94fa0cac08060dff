"""Building blocks shared by every model: dense, norm, attention, MLP, scanned transformer stacks."""
