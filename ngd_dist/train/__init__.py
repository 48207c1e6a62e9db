"""The training side: small built-in models and the quickstart job."""
