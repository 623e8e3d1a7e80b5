"""Metrics, tables, figures and reports of evaluate and train."""
