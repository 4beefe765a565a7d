"""One run, stage by stage: its options (``options``, ``params``), its set-up (``context``), the per-chunk work
(``chunks`` -> ``pages``: rows in, result rows out), a fan-out's shard plans and records (``shards``) and the
counts that must reconcile (``accounting``)."""
