"""Integration examples, each run by the test suite (tests/system/test_examples.py)."""
