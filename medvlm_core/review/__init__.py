"""The review workbench (``medvlm review``): a person checks the doubtful answers beside the page image, and their
corrections become the verified views and gold.

* ``queue``: what to check (low confidence, invalid values, pages without an answer, picked documents), from the
  output with DuckDB;
* ``pages``: one page's answer and items, with the corrections applied; ``images``: the page image;
* ``corrections``: the append-only ``corrections`` and ``access_log`` tables and the SQL of the verified views;
* ``export``: the reviewed pages as a gold file ``medvlm eval`` accepts;
* ``auth``: the token, the session cookie and the security headers; ``app``: the web application.

The core never imports Prefect; the ``medvlm review`` command (``flows/review_cli.py``) runs the app with uvicorn.
This package's ``__init__`` imports nothing, so that ``medvlm_core.analytics`` can import ``corrections`` alone.
"""
