"""Concept formats."""
