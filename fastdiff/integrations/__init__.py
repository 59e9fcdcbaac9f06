"""Adapters to other libraries, each importing its library lazily: diffusers.py (schedulers as
Samplers) and pipelines.py (accelerate(pipe))."""
