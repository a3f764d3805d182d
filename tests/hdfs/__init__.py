"""Tests against a real Kerberized HDFS (see tests/hdfs/conftest.py and harness/README.md)."""
