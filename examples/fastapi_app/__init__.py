"""FastAPI: an async Publisher opened in the app's lifespan, a typed handler in the worker."""
