"""Kubernetes settings for each task, from the config's `cluster` section (kfp-kubernetes).

Secrets go in by reference (a Secret's name and key) and cloud access by the Workload Identity
service account a run is submitted with, so the compiled YAML holds no credential.
"""

from kfp import kubernetes

from dreambooth.config import ClusterSettings

CACHE_MOUNT = "/cache"


def apply_cluster_settings(task, stage: str, cluster: ClusterSettings):
    resources = cluster.resources(stage)
    task.set_container_image(cluster.image)
    task.set_cpu_request(resources.cpu).set_memory_request(resources.memory).set_memory_limit(resources.memory)
    if resources.gpus:
        task.set_accelerator_type(cluster.gpu_type).set_accelerator_limit(resources.gpus)
        for label, value in cluster.node_selector.items():
            kubernetes.add_node_selector(task, label_key=label, label_value=value)
        if cluster.gpu_toleration_key:
            kubernetes.add_toleration(task, key=cluster.gpu_toleration_key, operator="Exists", effect="NoSchedule")
        # PyTorch data loaders and NCCL share memory through /dev/shm; the default 64 MiB is too small.
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=cluster.shm_size)
    if cluster.model_cache_pvc:
        kubernetes.mount_pvc(task, pvc_name=cluster.model_cache_pvc, mount_path=CACHE_MOUNT)
    for secret in cluster.secrets:
        kubernetes.use_secret_as_env(task, secret_name=secret.name, secret_key_to_env={secret.key: secret.env})
    kubernetes.set_security_context(task, run_as_user=cluster.run_as_user, run_as_non_root=True)
    kubernetes.set_timeout(task, resources.timeout_seconds)
    return apply_retry_policy(task, stage, cluster)


def apply_retry_policy(task, stage: str, cluster: ClusterSettings):
    """The stage's KFP retries; a local run (kfp.local honours them) gets them too, and nothing else of the cluster."""
    resources = cluster.resources(stage)
    if resources.retries:
        # KFP's default retry window is 3600 s from the first attempt: a longer stage would never be retried.
        window = (resources.retries + 1) * (resources.timeout_seconds + resources.retry_backoff_seconds)
        task.set_retry(
            num_retries=resources.retries,
            backoff_duration=f"{resources.retry_backoff_seconds}s",
            backoff_factor=2.0,
            backoff_max_duration=f"{window}s",
        )
    return task
