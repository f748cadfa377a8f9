"""Representation diagnostics: kNN evaluation and collapse metrics."""
