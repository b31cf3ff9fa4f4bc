-- C-FIND support (PostgreSQL). Keep in step with ../sqlite/0003_find.sql.

-- The Anatomic Region Sequence of each series' latest label, one row per coded region, so
-- C-FIND sequence matching on Code Value / Coding Scheme Designator is an indexed lookup.
-- Written with series.predicted_body_part (index::labels::finish_job).
CREATE TABLE series_regions (
    series_ref     BIGINT NOT NULL REFERENCES series(id),
    -- head to foot, as in series_labels.anatomic_regions
    position       BIGINT NOT NULL,
    body_part      TEXT,
    code_value     TEXT NOT NULL,
    coding_scheme  TEXT NOT NULL,
    code_meaning   TEXT,
    PRIMARY KEY (series_ref, position)
);
CREATE INDEX series_regions_code ON series_regions(code_value, coding_scheme);

-- Series labelled before this migration.
INSERT INTO series_regions (series_ref, position, body_part, code_value, coding_scheme, code_meaning)
SELECT s.id, r.ordinality - 1,
       r.value ->> 'body_part', r.value ->> 'code_value',
       r.value ->> 'coding_scheme', r.value ->> 'code_meaning'
FROM series s
JOIN series_labels l ON l.series_ref = s.id AND l.generation = s.label_generation
CROSS JOIN LATERAL jsonb_array_elements(l.anatomic_regions::jsonb) WITH ORDINALITY AS r(value, ordinality)
WHERE l.anatomic_regions IS NOT NULL
  AND jsonb_typeof(l.anatomic_regions::jsonb) = 'array'
  AND r.value ->> 'code_value' IS NOT NULL
  AND r.value ->> 'coding_scheme' IS NOT NULL;

-- Matching keys. text_pattern_ops serves both = and LIKE 'prefix%' whatever the database's
-- collation; Patient Name is matched case-insensitively on lower(); dates and times are
-- compared byte-wise (COLLATE "C"), as DICOM DA/TM strings sort.
CREATE INDEX patients_patient_id ON patients (patient_id text_pattern_ops);
CREATE INDEX patients_name_lower ON patients (lower(patient_name) text_pattern_ops);
CREATE INDEX studies_date ON studies (study_date COLLATE "C", study_time COLLATE "C");
CREATE INDEX studies_accession ON studies (accession_number text_pattern_ops);
CREATE INDEX series_predicted_body_part ON series (predicted_body_part text_pattern_ops);
CREATE INDEX series_received_body_part ON series (body_part_examined text_pattern_ops);
CREATE INDEX series_modality ON series (modality text_pattern_ops);
CREATE INDEX series_description ON series (series_description text_pattern_ops);
-- IMAGE level: the key-image rows of one instance in the series' latest label.
CREATE INDEX key_images_instance ON key_images (series_label_ref, sop_instance_uid);
