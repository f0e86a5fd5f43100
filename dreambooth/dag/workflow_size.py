"""How many Argo nodes a run of the compiled pipeline holds, and how many subjects fit one run.

KFP's v2 backend turns the IR into one Argo Workflow, and Argo keeps every node's status in that
object, which it refuses past about a megabyte (the etcd object limit; kubeflow/pipelines issues
about large ParallelFor loops). The count follows the templates KFP's Argo compiler writes
(backend/src/v2/compiler/argocompiler): the workflow's entrypoint, root driver and root DAG; per
container task a driver pod, an executor DAG and the executor pod (and a retry node when it has a
retry policy); per nested DAG (a condition, the exit handler's group) a driver pod and the DAG; per
loop a driver and the fan-out's group node, then per iteration an iteration driver and DAG. It is an
upper bound: every branch and every retry-wrapped task is counted as if it ran, each loop as long as
the shard (class-prior groups are at most one per subject).
"""

from __future__ import annotations

# Argo's limit is on bytes (1 MiB of Workflow object); at about a kibibyte of status per node (KFP passes
# each driver its task and component JSON), 1,000 nodes is where a workflow is at risk.
NODE_LIMIT = 1000


def workflow_nodes(spec: dict, iterations: int) -> int:
    """Argo nodes of one run of the compiled IR `spec` whose loops run `iterations` times."""

    def dag_nodes(component: dict) -> int:
        total = 0
        for task in component.get("dag", {}).get("tasks", {}).values():
            body = spec["components"][task["componentRef"]["name"]]
            if "executorLabel" in body:
                total += 3 + ("retryPolicy" in task)
            elif "parameterIterator" in task or "artifactIterator" in task:
                total += 2 + iterations * (2 + dag_nodes(body))
            else:
                total += 2 + dag_nodes(body)
        return total

    return 3 + dag_nodes(spec["root"])


def subjects_within(spec: dict, limit: int = NODE_LIMIT) -> int:
    """The most subjects one run of the DAG `spec` can hold under `limit` nodes (0 when not even one)."""
    fixed, per_subject = workflow_nodes(spec, 0), workflow_nodes(spec, 1) - workflow_nodes(spec, 0)
    return max(0, (limit - fixed) // max(per_subject, 1))
