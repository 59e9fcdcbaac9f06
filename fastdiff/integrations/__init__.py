"""Adapters to other libraries (diffusers.py: schedulers and pipelines); each imports its library lazily."""
