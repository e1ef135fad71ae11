"""AUTOMATIC1111-compatible HTTP API for sd15: `python -m server` (also `sd15-server`); server/app.py makes
the app (`create_app`) and lists its routes."""
