"""The KFP DAG and what builds and sends it: the pipeline (`pipeline`), the sharded batch's launcher
(`launcher`), runs and their parameters (`kfp_runs`), Argo node counts (`workflow_size`), cluster
settings per task (`platform`) and one thin component per stage (`components/`).
"""
