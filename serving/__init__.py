"""Serving the exported encoder: TF Serving configuration, a REST client, a local stand-in."""
