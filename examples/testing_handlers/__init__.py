"""Unit tests of an app's handlers with ``rabbitkeys.testing``: no broker."""
