"""The FUSE frontend (being split: server.py holds it whole for this commit)."""
