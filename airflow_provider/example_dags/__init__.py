"""Example DAGs of medvlm's Airflow provider: ``medvlm_batch``, ``medvlm_fanout`` and ``medvlm_nightly``.

Point Airflow's DAG folder at this package's folder, or copy a file into yours and change its defaults.
"""
