"""What a run reads: the manifest (``manifest``), its row checks (``manifest_checks``), document files decoded
into page images (``images``) and the prompt library (``prompts``)."""
