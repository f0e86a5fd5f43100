"""What each KFP component runs, callable without KFP, with MLflow at its edge: a subject's stages and
the class priors (`subject`), the batch's plan, prior groups, summary and exit handler (`batch`), the
launch of a sharded batch (`launch`) and a stage over several processes (`distributed`).
"""
