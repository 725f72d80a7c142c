"""The attach machinery (being split: attacher.py holds it whole for this commit)."""
