"""A batch's subjects before any model is trained: subjects files and their entries, the batch plan,
shards, experiments' variants and the records of forgotten subjects.
"""
