"""What each KFP component runs, callable without KFP.

`stages`: the per-subject stages (ingest, fine-tune, samples, evaluate, super-resolution) and the
class priors, each inside its MLflow run. `batch`: planning the batch, handing class priors to the
subjects, and the summary.
"""

import os

# A tracking server that is away fails a call in about a minute instead of MLflow's four (a restart
# within that minute is absorbed); step metrics never wait on it at all (dreambooth.tracking.spool).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
