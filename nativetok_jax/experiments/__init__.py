"""Experiments that test the paper's claims end to end, one command each."""
