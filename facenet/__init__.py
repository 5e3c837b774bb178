"""facenet: the ML library of FaceNet Stack (devices, data, training, tracking).

It never imports Celery or `services`; the service layer calls into it.
"""

__version__ = "0.1.0"
