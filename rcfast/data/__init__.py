"""Proxy-image data for rcfast: `ProxyImages` batches (DALI, or PIL) and the embedded demo data.

`ProxyImages` iterates normalised `[N, 3, S, S]` image batches from a folder or
a list file, sharded across DDP ranks, reproducible from (seed, epoch) and
resumable mid-epoch through `state_dict()` / `load_state_dict()`.
`demo_dataset(root)` writes the small digits data the training demo uses.
Importing this package does not import DALI; a DALI-backed `ProxyImages` does.
"""
from rcfast.extras import require

require("rcfast.data", "numpy", "PIL")  # before anything below imports them

# ruff: noqa: E402

from .demo import demo_dataset
from .proxy_images import IMAGENET_MEAN, IMAGENET_STD, ProxyImages
from .sources import cache_dir

__all__ = ["ProxyImages", "demo_dataset", "cache_dir", "IMAGENET_MEAN", "IMAGENET_STD"]
