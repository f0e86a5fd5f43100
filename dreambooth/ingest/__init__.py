"""Turning a folder of photos into training data: photos and their manifest (`photos`), the rare
identifier (`identifiers`), per-photo captions (`captions`) and face detection (`faces`).
"""
