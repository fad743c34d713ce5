"""kiq's worker: the Celery app (`worker.celery:app`), the model runner and its collaborators.

Importing this package loads no model framework nor the models; `Runner.setup()` does, once per process.
"""
