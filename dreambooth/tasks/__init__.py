"""What each KFP component runs, callable without KFP.

`stages`: the per-subject stages (ingest, fine-tune, samples, evaluate, super-resolution) and the
class priors, each inside its MLflow run. `batch`: planning the batch, handing class priors to the
subjects, and the summary.
"""
