"""The model files: GGUF metadata and the chat format a family needs (``files``), the local download cache
(``cache``), Spark NLP model zips (``spark_nlp``) and memory planning at load (``memory_plan``)."""
