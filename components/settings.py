"""Settings shared by every component: the container image and the shared volume's mount path."""

from __future__ import annotations

import os

DEFAULT_IMAGE = "easyref:0.1.0"
"""Image built from ``infra/Dockerfile`` (``make``-free: ``docker build -f infra/Dockerfile -t easyref:0.1.0 .``)."""

BASE_IMAGE: str = os.environ.get("EASYREF_IMAGE", DEFAULT_IMAGE)
"""The one image every component runs in; set ``EASYREF_IMAGE`` before importing the components to change it
(``python pipelines/full.py compile --image REGISTRY/easyref:TAG`` does this)."""

SHARED_MOUNT_PATH = "/mnt/easyref"
"""Where the shared ReadWriteMany volume (data, base models, training runs) is mounted in every pod."""
