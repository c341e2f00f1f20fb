"""Scoring samples beside the real-data floor: the metric (metric), its scores (scores), the
feature extractors (classifier, digits, inception), and the command (command, __main__)."""
