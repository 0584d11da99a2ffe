"""Figures and tables: image grids, result tables and plots."""
