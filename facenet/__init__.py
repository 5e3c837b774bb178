"""facenet: the ML library of FaceNet Stack (devices, data, training, tracking).

It never imports Celery or `services`; the service layer calls into it.
"""

import os

# torch >= 2.5 imports installed device extensions (torch_npu) inside `import torch`; on a host
# with torch_npu but no CANN/driver that turns every `import torch` into a traceback. We import
# torch_npu ourselves, lazily, and turn its failure into one sentence (facenet.devices).
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

__version__ = "0.1.0"
