"""Serving diffusion models: the HTTP server and what it runs on (NIRVANA's approximate cache)."""
