"""Prefect flows (deployment entrypoints) and the ``medvlm`` command-line interface."""
