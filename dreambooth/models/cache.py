"""Where the project keeps what it builds or downloads once per machine: tiny models, LPIPS
weights, gs:// model copies, the local work folder. A cluster points it at the model-cache PVC."""

import os
from pathlib import Path


def default_cache_dir() -> Path:
    return Path(os.environ.get("DREAMBOOTH_CACHE", Path.home() / ".cache" / "dreambooth-kfp"))
