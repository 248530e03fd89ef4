"""A minimal Django project: no database, sessions or auth, only what the example needs.

``DJANGO_SETTINGS_MODULE=examples.django_site.settings``. rabbitkeys itself reads its
``RABBITKEYS_*`` variables (the broker's URL, the namespace...), not these settings.
"""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "only-for-the-example")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["localhost", "127.0.0.1"]
ROOT_URLCONF = "examples.django_site.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
