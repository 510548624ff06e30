"""Side effects live here: DuckDB (db.py) and Chroma (index.py). Nothing else imports them.

Storage imports nothing from loop/: its errors live in errors.py (re-exported by loop.errors).
"""
