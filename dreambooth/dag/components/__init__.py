"""KFP v2 components: one file per stage, each a thin wrapper over dreambooth.tasks.

The same functions run under kfp.local's SubprocessRunner here and in the component
image on a cluster; the image has the `dreambooth` package installed, so nothing is
pip-installed at task start (install_kfp_package=False).
"""
