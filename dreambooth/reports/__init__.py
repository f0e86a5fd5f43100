"""What people read after a run: the batch summary (`summary`), run comparisons (`compare`), the
paper's tables (`paper_tables`) and HTML pages for KFP's UI (`pages`).
"""
