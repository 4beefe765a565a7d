"""Development tools, not the runtime: the tiny random-weight model generator, a local S3 server (SeaweedFS)
and the synthetic demo documents, used by the tests, the benchmark harness and ``medvlm demo``, plus the
fault injectors the crash tests hand to the isolated engine. Nothing in the runtime core imports this package.
"""
