"""Shared code for the DeBERTa scripts: export, graph surgery, the plugin reference, runtimes, timing and reports."""
