"""Synthetic datasets rendered on any machine (CATER-style scenes with MuJoCo)."""
