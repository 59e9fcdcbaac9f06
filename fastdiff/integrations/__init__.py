"""Adapters to other libraries, each importing its library lazily: diffusers.py (schedulers as
Samplers) and pipelines/ (accelerate(pipe), one module per pipeline family)."""
