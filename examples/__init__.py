"""Integration examples, each run by the test suite (tests/test_examples.py)."""
