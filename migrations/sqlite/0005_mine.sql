-- `anatomy-node mine` (SQLite). Keep in step with ../postgres/0005_mine.sql.
--
-- What each dataset folder holds is recorded here, so a second run mines nothing new, a run
-- killed half way is resumed without duplicates, and manifest.csv can always be rewritten
-- from these rows (in their order).

-- One row per dataset folder (the id is in <out>/mine.json).
CREATE TABLE mine_datasets (
    id           TEXT PRIMARY KEY,
    -- where it was written last (for people; the folder may move)
    out_path     TEXT NOT NULL,
    -- HMAC(mine.patient_key_secret, "anatomy-node key check"), hex: a run with another secret
    -- (other patient keys, other splits) is refused
    key_check    TEXT NOT NULL,
    image_size   BIGINT NOT NULL,
    split        TEXT NOT NULL,
    created_at   BIGINT NOT NULL
);

-- One row per run: when, what window, how it ended, its report (JSON).
CREATE TABLE mine_runs (
    id           INTEGER PRIMARY KEY,
    dataset_id   TEXT NOT NULL REFERENCES mine_datasets(id),
    started_at   BIGINT NOT NULL,
    finished_at  BIGINT,
    since_date   TEXT NOT NULL,
    until_date   TEXT NOT NULL,
    exit_code    BIGINT,
    report       TEXT
);

-- One row per study seen in the archive: mined (done), or failed (retried next run).
CREATE TABLE mine_studies (
    dataset_id   TEXT NOT NULL REFERENCES mine_datasets(id),
    study_uid    TEXT NOT NULL,
    -- what the study looked like when it was mined (instance count, label evidence, rules);
    -- a study whose fingerprint is unchanged is not looked at again
    fingerprint  TEXT NOT NULL,
    -- 'done' or 'failed'
    state        TEXT NOT NULL,
    attempts     BIGINT NOT NULL DEFAULT 0,
    last_error   TEXT,
    images       BIGINT NOT NULL DEFAULT 0,
    updated_at   BIGINT NOT NULL,
    PRIMARY KEY (dataset_id, study_uid)
);

-- One row per manifest row: the dataset's content, in manifest order (id).
CREATE TABLE mine_images (
    id                INTEGER PRIMARY KEY,
    dataset_id        TEXT NOT NULL REFERENCES mine_datasets(id),
    run_ref           BIGINT NOT NULL REFERENCES mine_runs(id),
    image             TEXT NOT NULL,
    patient_key       TEXT NOT NULL,
    study_uid         TEXT NOT NULL,
    series_uid        TEXT NOT NULL,
    sop_instance_uid  TEXT NOT NULL,
    frame             BIGINT NOT NULL,
    z_mm              TEXT NOT NULL,
    label             TEXT NOT NULL,
    label_source      TEXT NOT NULL,
    split             TEXT NOT NULL,
    mined_at          BIGINT NOT NULL,
    UNIQUE (dataset_id, sop_instance_uid, frame)
);
CREATE INDEX mine_images_study ON mine_images(dataset_id, study_uid);
