-- The index of received instances (SQLite). Keep in step with ../postgres/0001_index.sql:
-- both databases run the same code and the same tests.
-- Times are Unix epoch milliseconds (BIGINT); text attributes are stored as received.

CREATE TABLE patients (
    id                    INTEGER PRIMARY KEY,
    -- PatientID and IssuerOfPatientID as received, joined by a backslash
    patient_key           TEXT NOT NULL UNIQUE,
    patient_id            TEXT,
    issuer_of_patient_id  TEXT,
    patient_name          TEXT,
    patient_birth_date    TEXT,
    patient_sex           TEXT,
    updated_at            BIGINT NOT NULL
);

CREATE TABLE studies (
    id                 INTEGER PRIMARY KEY,
    study_uid          TEXT NOT NULL UNIQUE,
    patient_ref        BIGINT NOT NULL REFERENCES patients(id),
    study_date         TEXT,
    study_time         TEXT,
    study_description  TEXT,
    accession_number   TEXT,
    study_id           TEXT,
    updated_at         BIGINT NOT NULL
);
CREATE INDEX studies_patient ON studies(patient_ref);

CREATE TABLE series (
    id                  INTEGER PRIMARY KEY,
    series_uid          TEXT NOT NULL UNIQUE,
    study_ref           BIGINT NOT NULL REFERENCES studies(id),
    series_number       BIGINT,
    modality            TEXT,
    series_description  TEXT,
    -- BodyPartExamined as the sender wrote it (often empty or wrong: the reason this node exists)
    body_part_examined  TEXT,
    first_received_at   BIGINT NOT NULL,
    last_received_at    BIGINT NOT NULL,
    -- 'receiving' until no instance arrived for series.stable_after_secs, then 'complete'
    state               TEXT NOT NULL DEFAULT 'receiving',
    -- bumped when a late instance re-opens a complete series
    generation          BIGINT NOT NULL DEFAULT 1,
    completed_at        BIGINT
);
CREATE INDEX series_study ON series(study_ref);
CREATE INDEX series_state ON series(state, last_received_at);

CREATE TABLE instances (
    id                   INTEGER PRIMARY KEY,
    sop_instance_uid     TEXT NOT NULL UNIQUE,
    series_ref           BIGINT NOT NULL REFERENCES series(id),
    sop_class_uid        TEXT NOT NULL,
    instance_number      BIGINT,
    image_position       TEXT,
    image_orientation    TEXT,
    image_type           TEXT,
    image_rows           BIGINT,
    image_columns        BIGINT,
    number_of_frames     BIGINT,
    transfer_syntax_uid  TEXT NOT NULL,
    -- relative to storage.path
    file_path            TEXT NOT NULL,
    file_size            BIGINT NOT NULL,
    calling_ae           TEXT NOT NULL,
    received_at          BIGINT NOT NULL
);
CREATE INDEX instances_series ON instances(series_ref);

-- Durable work for later stages: one 'series-complete' row per completed series generation.
-- Consumers claim rows (FOR UPDATE SKIP LOCKED on PostgreSQL) and mark them done.
CREATE TABLE work_queue (
    id            INTEGER PRIMARY KEY,
    kind          TEXT NOT NULL,
    series_ref    BIGINT NOT NULL REFERENCES series(id),
    generation    BIGINT NOT NULL,
    state         TEXT NOT NULL DEFAULT 'pending',
    attempts      BIGINT NOT NULL DEFAULT 0,
    created_at    BIGINT NOT NULL,
    available_at  BIGINT NOT NULL,
    claimed_by    TEXT,
    claimed_at    BIGINT,
    finished_at   BIGINT,
    last_error    TEXT,
    UNIQUE (kind, series_ref, generation)
);
CREATE INDEX work_queue_ready ON work_queue(kind, state, available_at);
