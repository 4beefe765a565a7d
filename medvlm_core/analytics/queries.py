"""The built-in queries: the questions analysts ask first (``medvlm query NAME``, the ``medvlm-report``
flow). Tests run each of them on real pipeline output."""

# They read the current views, except throughput_per_run (each run row is its own fact).
EXAMPLE_QUERIES = {
    "medications_per_diagnosis": """
        select d.name as diagnosis, m.name as medication, count(*) as pages
        from diagnoses_current d join medications_current m using (result_key, run_id)
        group by all order by pages desc, diagnosis, medication limit 20""",
    "conditional_instructions": """
        select document_id, page, text, condition, follow_up_interval
        from instructions_current where conditional order by document_id, page, item_index""",
    "errors_by_type": """
        select error_type, count(distinct document_id) as documents, count(*) as pages
        from completions_current where status = 'error' group by error_type order by pages desc, error_type""",
    "still_failing": """
        select document_id, pages, ok, error, truncated, quarantined, error_types, latest_run_id, latest_at
        from document_status where error > 0 or quarantined > 0 order by latest_at desc, document_id""",
    "document_status": """
        select * from document_status order by document_id""",
    "throughput_per_run": """
        select run_id, pages_ok, pages_error, skipped_pages, round(wall_seconds, 2) as seconds,
               round(pages_per_second, 3) as pages_per_second,
               round(completion_tokens_per_second, 1) as tokens_per_second
        from runs order by started_at""",
}
