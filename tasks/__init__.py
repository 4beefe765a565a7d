"""Thin Prefect tasks over medvlm_core: each wraps one stage and adds retries, logging and state."""
