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
    # Coded answers (docs/codes.md): a diagnosis the document rules out, a relative's or a possibility is not the
    # patient's; patients are counted by patient_id, documents besides (a manifest may have no patient ids).
    "patients_by_icd10cm_chapter": """
        select icd10cm_chapter as chapter, count(distinct patient_id) as patients,
               count(distinct document_id) as documents, count(*) as diagnoses
        from diagnoses_current
        where icd10cm_code is not null and not coalesce(negated, false) and not coalesce(family_history, false)
          and not coalesce(hypothetical, false)
        group by icd10cm_chapter order by patients desc, documents desc, chapter""",
    "patients_by_icd10cm_category": """
        select icd10cm_category as category, any_value(icd10cm_chapter) as chapter,
               count(distinct patient_id) as patients, count(distinct document_id) as documents,
               count(*) as diagnoses, mode(icd10cm_code) as most_common_code
        from diagnoses_current
        where icd10cm_code is not null and not coalesce(negated, false) and not coalesce(family_history, false)
          and not coalesce(hypothetical, false)
        group by icd10cm_category order by patients desc, documents desc, category limit 100""",
    "medications_by_generic_name": """
        select generic_name, any_value(drugbank_id) as drugbank_id, count(distinct patient_id) as patients,
               count(distinct document_id) as documents, count(*) as mentions,
               list_slice(list(distinct name order by name), 1, 5) as written_as,
               count(*) filter (where prn) as prn_mentions, median(frequency_per_day) as median_per_day
        from medications_current where generic_name is not null
        group by generic_name order by documents desc, generic_name limit 100""",
    "throughput_per_run": """
        select run_id, pages_ok, pages_error, skipped_pages, round(wall_seconds, 2) as seconds,
               round(pages_per_second, 3) as pages_per_second,
               round(completion_tokens_per_second, 1) as tokens_per_second
        from runs order by started_at""",
}
