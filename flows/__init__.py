"""Prefect flows: wiring of the stages in tasks/ (the pipeline flow and its deployment)."""
