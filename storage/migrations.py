"""Numbered schema migrations, applied in order on open. Never edit one that has shipped: add one."""

from __future__ import annotations

M001_CREATE_TABLES = """
CREATE TABLE documents (
    doc_id        VARCHAR PRIMARY KEY,
    source        VARCHAR NOT NULL,
    title         VARCHAR NOT NULL DEFAULT '',
    content_hash  VARCHAR NOT NULL,
    n_chars       INTEGER NOT NULL,
    created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp,
    updated_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
);
CREATE TABLE passages (
    passage_id    VARCHAR PRIMARY KEY,           -- content hash of the text
    text          VARCHAR NOT NULL,
    n_tokens      INTEGER NOT NULL,
    created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
);
CREATE TABLE doc_passages (
    doc_id        VARCHAR NOT NULL,
    ordinal       INTEGER NOT NULL,
    passage_id    VARCHAR NOT NULL,
    PRIMARY KEY (doc_id, ordinal)
);
CREATE INDEX doc_passages_passage ON doc_passages (passage_id);
CREATE TABLE queries (
    query_id      VARCHAR PRIMARY KEY,
    text          VARCHAR NOT NULL,
    source        VARCHAR NOT NULL DEFAULT '',
    created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
);
CREATE TABLE pairs (
    pair_id       VARCHAR PRIMARY KEY,
    anchor        VARCHAR NOT NULL,
    positive_id   VARCHAR,
    positive_text VARCHAR NOT NULL,
    negative_id   VARCHAR,
    negative_text VARCHAR,
    score         DOUBLE,
    source        VARCHAR NOT NULL CHECK (source IN ('seed', 'synthetic', 'mined', 'edited')),
    status        VARCHAR NOT NULL CHECK (status IN ('candidate', 'pending', 'accepted', 'rejected', 'dropped')),
    split         VARCHAR NOT NULL DEFAULT 'train' CHECK (split IN ('train', 'eval', 'test')),
    round         INTEGER,
    query_id      VARCHAR,
    origin        VARCHAR NOT NULL DEFAULT '',   -- file or generator that produced it
    meta          JSON,
    created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp,
    updated_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
);
CREATE SEQUENCE decision_seq START 1;
CREATE TABLE decisions (                       -- append-only: the code never updates or deletes
    decision_id   BIGINT PRIMARY KEY DEFAULT nextval('decision_seq'),
    pair_id       VARCHAR NOT NULL,
    reviewer      VARCHAR NOT NULL,
    action        VARCHAR NOT NULL,
    payload       JSON,
    decided_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
);
CREATE TABLE rounds (
    round         INTEGER PRIMARY KEY,
    state         VARCHAR NOT NULL,
    error         VARCHAR,
    manifest      JSON,
    started_at    TIMESTAMP NOT NULL DEFAULT current_timestamp,
    updated_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
);
CREATE TABLE model_versions (
    version       VARCHAR PRIMARY KEY,
    path          VARCHAR NOT NULL,
    parent        VARCHAR,
    sha256        VARCHAR NOT NULL,
    round         INTEGER,
    status        VARCHAR NOT NULL DEFAULT 'candidate',
    metrics       JSON,
    created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
);
CREATE TABLE index_versions (
    collection    VARCHAR PRIMARY KEY,
    model_version VARCHAR NOT NULL,
    status        VARCHAR NOT NULL CHECK (status IN ('building', 'verified', 'active', 'retired', 'failed')),
    count         INTEGER NOT NULL DEFAULT 0,
    detail        VARCHAR,
    created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp,
    activated_at  TIMESTAMP
);
CREATE TABLE jobs (
    job_id        VARCHAR PRIMARY KEY,
    kind          VARCHAR NOT NULL,
    status        VARCHAR NOT NULL,
    pid           INTEGER,
    args          JSON,
    progress      JSON,
    error         VARCHAR,
    created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp,
    updated_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
);
CREATE TABLE llm_cache (
    cache_key      VARCHAR PRIMARY KEY,          -- hash of (passage hash, prompt id@version, llm model)
    passage_hash   VARCHAR NOT NULL,
    prompt         VARCHAR NOT NULL,
    llm_model      VARCHAR NOT NULL,
    response       JSON NOT NULL,
    prompt_tokens  INTEGER NOT NULL DEFAULT 0,
    output_tokens  INTEGER NOT NULL DEFAULT 0,
    round          INTEGER,
    created_at     TIMESTAMP NOT NULL DEFAULT current_timestamp
);
CREATE TABLE pointers (                        -- active model / index, switched atomically
    name          VARCHAR PRIMARY KEY,
    value         VARCHAR NOT NULL,
    updated_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
);
"""

M002_REVIEW_QUEUE = """
ALTER TABLE pairs ADD COLUMN priority DOUBLE;            -- expected value of a human label
ALTER TABLE pairs ADD COLUMN reason VARCHAR;             -- why routed where it is
ALTER TABLE pairs ADD COLUMN claimed_by VARCHAR;         -- reviewer holding the card
ALTER TABLE pairs ADD COLUMN claim_expires TIMESTAMP;    -- the card returns to the queue after this
CREATE TABLE negatives (                                 -- hard negatives for an anchor
    anchor        VARCHAR NOT NULL,
    passage_id    VARCHAR NOT NULL,
    source        VARCHAR NOT NULL,                      -- 'review' (rejected / replaced) or 'mined'
    round         INTEGER,
    created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (anchor, passage_id)
);
"""

M003_WORKSPACE_ID = """
CREATE TABLE workspace_info (                            -- one row
    workspace_id  VARCHAR NOT NULL,                      -- in this workspace's Chroma collection names
    created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
);
INSERT INTO workspace_info (workspace_id) VALUES (substr(replace(CAST(gen_random_uuid() AS VARCHAR), '-', ''), 1, 8));
"""

M004_TRAINED_QUERIES = """
CREATE TABLE trained_queries (                           -- every query a round's training snapshot held:
    anchor        VARCHAR PRIMARY KEY,                   -- it can never join the held-out set later
    round         INTEGER                                -- NULL: trained before this table existed
);
INSERT INTO trained_queries SELECT DISTINCT anchor, NULL FROM pairs WHERE status = 'accepted' AND split = 'train';
"""

# (number, name, sql). The schema version of a database is the highest number applied.
MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "create_tables", M001_CREATE_TABLES),
    (2, "review_queue", M002_REVIEW_QUEUE),
    (3, "workspace_id", M003_WORKSPACE_ID),
    (4, "trained_queries", M004_TRAINED_QUERIES),
]
