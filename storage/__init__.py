"""Side effects live here: DuckDB (db.py) and Chroma (index.py). Nothing else imports them."""
