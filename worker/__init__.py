"""Celery workers that run fine-tuning jobs (the task code is the same for every broker)."""
