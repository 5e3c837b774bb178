"""The queue: the Celery app and its message guard, the job registry, the task shells and what they call (an
attempt at a train job, the trainer process toolkit, gangs over several nodes), the worker's signals and sweep,
Flower events, the client side of jobs and the MLflow runs they make. Importing it imports neither torch nor
the Celery app."""
