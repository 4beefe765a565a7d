"""What a run writes: the output tables (``tables``, each defined once), row statuses (``status``), where each
file lives under an output (``paths``), Parquet writing (``results``), structured extraction tables
(``structured``), publishing (``publish``), the done index (``done_index``) and the output's lease (``lease``)."""
