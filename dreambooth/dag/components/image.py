"""The container image every component runs in on a cluster.

Read when the components are defined (at compile time): set DREAMBOOTH_COMPONENT_IMAGE to the
image you pushed, pinned by digest so KFP's cache never serves a step built from an older image.
"""

import os

COMPONENT_IMAGE = os.environ.get("DREAMBOOTH_COMPONENT_IMAGE", "dreambooth-kfp:0.1.0")
