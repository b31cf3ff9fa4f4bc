-- The audit trail (SQLite). Keep in step with ../postgres/0006_audit.sql.
--
-- Who did what: one row per event (association accepted or refused, instances received on
-- an association, C-FIND, forwarded batch, HTTP request, authentication failure, node start
-- and stop). Written by the node's audit recorder (src/audit.rs), listed by
-- `anatomy-node audit`. UIDs, AE titles, token names and addresses only: never patient
-- names, IDs or other PHI.
CREATE TABLE audit_events (
    id            INTEGER PRIMARY KEY,
    -- milliseconds since 1970-01-01 UTC
    occurred_at   BIGINT NOT NULL,
    -- node_start, node_stop, association_accepted, association_refused, instances_received,
    -- c_find, forward, http_request, auth_failure
    event_type    TEXT NOT NULL,
    -- success, failure or refused
    outcome       TEXT NOT NULL,
    -- calling AE title, HTTP principal ("token NAME", "jwt SUBJECT", "anonymous"), or the
    -- node itself
    actor         TEXT NOT NULL,
    -- the peer's address (ip:port), when there is one
    peer          TEXT,
    -- the peer's TLS certificate subject (DICOM TLS, HTTPS client certificates)
    cert_subject  TEXT,
    -- Study / Series Instance UIDs the event concerns (comma-separated when several)
    studies       TEXT,
    series        TEXT,
    -- what else it concerns: an HTTP route, a destination, a query level, a config file
    object        TEXT,
    -- free text: a reason, counts, a status
    detail        TEXT
);
CREATE INDEX audit_events_time ON audit_events(occurred_at);
CREATE INDEX audit_events_type ON audit_events(event_type, occurred_at);
