"""DreamBooth subject personalisation (Ruiz et al., 2022) as plain, pipeline-ready stages.

Each stage module (ingest, priors, finetune, samples) is a plain function that runs
without Kubeflow; `dreambooth.components` wraps them for KFP and `dreambooth.pipeline` chains them.
"""

__version__ = "0.1.0"
