-- Routing and forwarding (SQLite). Keep in step with ../postgres/0004_forward.sql.

-- When a label result was routed: set in the same transaction that creates its outbox jobs
-- (forward::outbox::route_next), so a crash between labelling and routing loses nothing and
-- a label is never routed twice.
ALTER TABLE series_labels ADD COLUMN routed_at BIGINT;
-- Results recorded before forwarding existed are not forwarded after an upgrade.
UPDATE series_labels SET routed_at = labelled_at;
CREATE INDEX series_labels_unrouted ON series_labels(id) WHERE routed_at IS NULL;

-- The durable outbox: one row per (instance, destination, series generation).
CREATE TABLE forward_jobs (
    id                INTEGER PRIMARY KEY,
    -- destinations[].name in the configuration
    destination       TEXT NOT NULL,
    -- 'instance' (a stored instance, sent as a tagged copy) or 'kos' (the Key Object
    -- Selection document of the label, made when it is sent)
    kind              TEXT NOT NULL,
    -- the stored instance (NULL for 'kos')
    instance_ref      BIGINT REFERENCES instances(id),
    series_ref        BIGINT NOT NULL REFERENCES series(id),
    generation        BIGINT NOT NULL,
    -- the label result whose tags the copy carries
    label_ref         BIGINT NOT NULL REFERENCES series_labels(id),
    sop_instance_uid  TEXT NOT NULL,
    -- names of the routes that matched, comma-separated
    routes            TEXT NOT NULL,
    -- 'pending' (waiting, maybe for a retry), 'sending' (claimed by a node), 'done',
    -- 'dead' (given up: last_error says why), 'superseded' (a newer generation replaced it)
    state             TEXT NOT NULL DEFAULT 'pending',
    attempts          BIGINT NOT NULL DEFAULT 0,
    created_at        BIGINT NOT NULL,
    available_at      BIGINT NOT NULL,
    claimed_by        TEXT,
    claimed_at        BIGINT,
    finished_at       BIGINT,
    -- DIMSE status of the last C-STORE-RSP (NULL when none came back)
    last_status       BIGINT,
    last_error        TEXT,
    UNIQUE (sop_instance_uid, destination, generation)
);
CREATE INDEX forward_jobs_ready ON forward_jobs(destination, state, available_at);
CREATE INDEX forward_jobs_series ON forward_jobs(series_ref, generation);
