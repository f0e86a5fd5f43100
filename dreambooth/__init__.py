"""DreamBooth subject personalisation (Ruiz et al., 2022) as plain, pipeline-ready stages.

Each stage (ingest, priors, fine_tune, samples, super_resolution, evaluation) is a plain function that runs
without Kubeflow; `dreambooth.dag.components` wraps them for KFP and `dreambooth.dag.pipeline` chains them.
"""

__version__ = "0.1.0"
