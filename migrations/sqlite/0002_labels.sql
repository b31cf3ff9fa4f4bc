-- What the classifier found (SQLite). Keep in step with ../postgres/0002_labels.sql.

-- One row per classified series generation.
CREATE TABLE series_labels (
    id                  INTEGER PRIMARY KEY,
    series_ref          BIGINT NOT NULL REFERENCES series(id),
    generation          BIGINT NOT NULL,
    -- 'labelled', 'skipped' (nothing to classify: the reason says why) or 'failed'
    status              TEXT NOT NULL,
    reason              TEXT,
    -- JSON list of problems that did not stop the classification (e.g. an unreadable image)
    notes               TEXT,
    dominant_class      TEXT,
    -- the Body Part Examined defined term for the whole series, and its CID 4031 code
    body_part_examined  TEXT,
    -- JSON: the regions present, head to foot [{"body_part","code_value","coding_scheme","code_meaning"}]
    anatomic_regions    TEXT,
    -- JSON: contiguous z-ranges per class [{"class","z_from_mm","z_to_mm","images"}]
    coverage            TEXT,
    -- JSON list of the model's classes (the order of key_images.probabilities)
    classes             TEXT,
    model_version       TEXT,
    provider            TEXT,
    key_images          BIGINT NOT NULL DEFAULT 0,
    candidate_images    BIGINT NOT NULL DEFAULT 0,
    select_ms           BIGINT,
    decode_ms           BIGINT,
    infer_ms            BIGINT,
    total_ms            BIGINT,
    labelled_at         BIGINT NOT NULL,
    UNIQUE (series_ref, generation)
);

-- One row per key-image of a labelled series.
CREATE TABLE key_images (
    id                INTEGER PRIMARY KEY,
    series_label_ref  BIGINT NOT NULL REFERENCES series_labels(id),
    sop_instance_uid  TEXT NOT NULL,
    -- 0-based frame within the instance
    frame             BIGINT NOT NULL,
    z_mm              DOUBLE PRECISION NOT NULL,
    -- the class with the highest probability for this image alone (before smoothing)
    label             TEXT NOT NULL,
    -- the smoothed label the coverage was read from
    smoothed_label    TEXT NOT NULL,
    -- JSON object {class: probability}
    probabilities     TEXT NOT NULL
);
CREATE INDEX key_images_label ON key_images(series_label_ref);

-- The latest result, on the series itself, for queries.
ALTER TABLE series ADD COLUMN label_status TEXT;
ALTER TABLE series ADD COLUMN label_generation BIGINT;
ALTER TABLE series ADD COLUMN predicted_class TEXT;
ALTER TABLE series ADD COLUMN predicted_body_part TEXT;
