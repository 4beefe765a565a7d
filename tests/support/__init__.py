"""Helpers the tests share: the S3 fault proxy and the reliability report."""
