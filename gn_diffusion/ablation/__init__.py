"""Norm ablations: the grid of cells (grid), the sweep that trains and scores them (sweep),
their results (results), the report (report) and its plots (plot), and the command (command,
__main__)."""
