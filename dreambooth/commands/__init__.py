"""The operator commands behind the CLI: a local run and its console, kfp.local's wording,
submit and schedule on a cluster, preflight checks and forgetting a subject.
"""
