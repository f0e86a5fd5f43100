"""DreamBooth personalisation as a Kubeflow pipeline: `python pipeline.py COMMAND ...` in a checkout.

The same command line is installed as `dreambooth` (pyproject's console script). The DAG is
dreambooth/dag/pipeline.py, its components dreambooth/dag/components/, the shipped configs dreambooth/configs/.
"""

import sys

from dreambooth.cli import main

if __name__ == "__main__":
    sys.exit(main())
