"""The Airflow suite runs in its own environment (``make test-airflow``), apart from the main suite's conftest."""
