"""Searches that fit a compression schedule to a model on its training images (DiffRate's
rate search, Zero-TPrune's settings)."""
