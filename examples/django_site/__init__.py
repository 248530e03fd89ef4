"""Django: a view publishes with ``rabbitkeys.publish`` (sync); a plain ``def`` handler."""
