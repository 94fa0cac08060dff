"""Judging reconstructions: metrics and image grids."""
