"""services: the service layer (Celery app, tasks, job registry, CLI, local stack).

Depends on `facenet`; `facenet` never imports this package.
"""
