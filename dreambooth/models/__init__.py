"""Models by hub id or path: loading and family detection (`loading`), the offline tiny models
(`tiny`), the local model cache (`cache`) and the LPIPS network's weights (`lpips`).
"""
