"""Searches that learn a compression schedule on data (DiffRate's rate search)."""
